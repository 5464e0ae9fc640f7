//! The HTTP API (default 127.0.0.1:8888): JSON, RFC 3339 times, errors as
//! `{"error": "..."}` with a 4xx/5xx status. Every handler asks the engine and renders its
//! answer; the API holds no run state of its own. Who may call what is decided in front of
//! these handlers (`ui/auth.rs`); the handlers that act pass the caller on for the audit
//! trail.
// Input from clients, files or wrappers reaches arithmetic here, so every operation that could
// overflow or index out of bounds is written checked ("Totality" in docs/ARCHITECTURE.md).
#![warn(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::forward;
use crate::ui::UiContext;
use crate::ui::auth::Caller;
use crate::ui::query::{self, QueryError};
use saltpeter_config::Config;
use saltpeter_engine::{ApiError, ApiRequest, EngineHandle};
use saltpeter_store::Query;

/// The API's router. The configuration gives the caps on what a request may ask for.
pub fn router(engine: EngineHandle, config: watch::Receiver<Arc<Config>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/version", get(version))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{job}/run", post(run_now))
        .route("/api/v1/jobs/{job}/runs", get(job_runs))
        .route("/api/v1/runs/{instance}", get(get_run))
        .route(
            "/api/v1/runs/{instance}/machines/{machine}/output",
            get(machine_output),
        )
        .route("/api/v1/runs/{instance}/kill", post(kill_run))
        .route(
            "/api/v1/runs/{instance}/machines/{machine}/kill",
            post(kill_machine),
        )
        .with_state(UiContext { engine, config })
}

impl FromRef<UiContext> for EngineHandle {
    fn from_ref(ctx: &UiContext) -> EngineHandle {
        ctx.engine.clone()
    }
}

/// An error response.
#[derive(Debug)]
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<QueryError> for Failure {
    fn from(e: QueryError) -> Self {
        Failure(StatusCode::BAD_REQUEST, e.0)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(m) => Failure(StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => Failure(StatusCode::CONFLICT, m),
            e @ ApiError::Elsewhere { .. } => {
                Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

fn engine_gone() -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "the master is shutting down".into(),
    )
}

/// `GET /healthz`: answers while the master runs, with no token and whatever the `Host`,
/// for load balancers and service checks. It says nothing about jobs.
async fn healthz() -> &'static str {
    "ok"
}

/// Who made a request, as the guard found; a router without the guard (never the master's)
/// has an unknown caller.
fn actor(caller: Option<Extension<Caller>>) -> saltpeter_store::audit::Actor {
    caller.map_or_else(Caller::unknown, |c| c.0).actor()
}

/// `GET /api/v1/audit`: the audit trail, newest first: `before` (only entries with a smaller
/// `id`, the last `id` of a page) and `limit` (default 100, at most `api_max_runs_page`).
async fn audit(
    State(ctx): State<UiContext>,
    axum::extract::Query(params): axum::extract::Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let limits = ctx.config.borrow().settings.limits;
    let page = query::audit_page(&params, &limits)?;
    let limit = page.limit;
    let entries = ctx
        .engine
        .ask(|reply| {
            ApiRequest::Store(Query::Audit {
                before: page.before,
                limit,
                reply,
            })
        })
        .await
        .ok_or_else(engine_gone)?
        .map_err(store_failed)?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({ "entries": entries, "next_before": next })).into_response())
}

/// `GET /api/v1/cluster`: with several masters, this one's id, the live masters and who
/// holds each job; 404 with one master.
async fn cluster(State(engine): State<EngineHandle>) -> Result<Response, Failure> {
    let status = engine
        .ask(ApiRequest::Cluster)
        .await
        .ok_or_else(engine_gone)?
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, "this master runs alone".into()))?;
    Ok(Json(status).into_response())
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn list_jobs(State(engine): State<EngineHandle>) -> Result<Response, Failure> {
    let jobs = engine
        .ask(ApiRequest::ListJobs)
        .await
        .ok_or_else(engine_gone)?;
    Ok(Json(json!({ "jobs": jobs })).into_response())
}

async fn run_now(
    State(ctx): State<UiContext>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Response, Failure> {
    let by = actor(caller);
    let path = format!("/api/v1/jobs/{job}/run");
    let answer = ctx
        .engine
        .ask(|reply| ApiRequest::RunNow { job, by, reply })
        .await
        .ok_or_else(engine_gone)?;
    match answer {
        Ok(instance) => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "instance": instance }))).into_response())
        }
        Err(ApiError::Elsewhere { job, holder }) => {
            Ok(elsewhere(&ctx, &job, holder, path, &headers).await)
        }
        Err(e) => Err(e.into()),
    }
}

/// A request for a job another master holds goes there (once), with the caller's token.
async fn elsewhere(
    ctx: &UiContext,
    job: &str,
    holder: Option<saltpeter_engine::MasterRef>,
    path: String,
    headers: &HeaderMap,
) -> Response {
    match holder {
        Some(holder) if !forward::was_forwarded(headers) => {
            // With TLS the masters share one certificate, which then pins each of them.
            let ca = ctx.config.borrow().settings.tls_cert.clone();
            forward::post(&holder, path, headers, ca).await
        }
        _ => forward::unavailable(format!(
            "no master acts for job {job} here at the moment; try again in a few seconds"
        )),
    }
}

async fn get_run(
    State(engine): State<EngineHandle>,
    Path(instance): Path<String>,
) -> Result<Response, Failure> {
    let wanted = instance.clone();
    let in_memory = engine
        .ask(|reply| ApiRequest::GetRun { instance, reply })
        .await
        .ok_or_else(engine_gone)?;
    if let Some(run) = in_memory {
        return Ok(Json(run).into_response());
    }
    // Older runs live only in the store.
    let instance = wanted.clone();
    let stored = engine
        .ask(|reply| ApiRequest::Store(Query::Run { instance, reply }))
        .await
        .ok_or_else(engine_gone)?
        .map_err(store_failed)?
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no run {wanted:?}")))?;
    Ok(Json(stored).into_response())
}

fn store_failed(error: saltpeter_store::StoreError) -> Failure {
    tracing::error!(%error, "History query failed.");
    Failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the run history is unavailable".into(),
    )
}

/// A job's runs, newest first, from the store: `before` (only runs that started before this
/// RFC 3339 time, the last `started` of a page) and `limit` (default 20, at most
/// `api_max_runs_page`).
async fn job_runs(
    State(ctx): State<UiContext>,
    Path(job): Path<String>,
    axum::extract::Query(params): axum::extract::Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let limits = ctx.config.borrow().settings.limits;
    let page = query::runs_page(&params, &limits)?;
    let limit = page.limit;
    let runs = ctx
        .engine
        .ask(|reply| {
            ApiRequest::Store(Query::Runs {
                job,
                before: page.before,
                limit,
                reply,
            })
        })
        .await
        .ok_or_else(engine_gone)?
        .map_err(store_failed)?;
    let next = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.started.clone()))
        .flatten();
    Ok(Json(json!({ "runs": runs, "next_before": next })).into_response())
}

/// A machine's full stored output (or a byte range of it) as plain text. The total length and
/// how much retention dropped are in `X-Output-Total-Bytes` and `X-Output-Dropped-Bytes`.
async fn machine_output(
    State(engine): State<EngineHandle>,
    Path((instance, machine)): Path<(String, String)>,
    axum::extract::Query(params): axum::extract::Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let range = query::byte_range(&params)?;
    let what = format!("no output for {machine:?} in {instance:?}");
    let output = engine
        .ask(|reply| {
            ApiRequest::Store(Query::Output {
                instance,
                machine,
                offset: range.offset,
                length: range.length,
                reply,
            })
        })
        .await
        .ok_or_else(engine_gone)?
        .map_err(store_failed)?
        .ok_or(Failure(StatusCode::NOT_FOUND, what))?;
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static("x-output-total-bytes"),
                output.total_bytes.to_string(),
            ),
            (
                axum::http::HeaderName::from_static("x-output-dropped-bytes"),
                output.dropped_bytes.to_string(),
            ),
        ],
        output.text,
    )
        .into_response())
}

async fn kill_run(
    State(ctx): State<UiContext>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path(instance): Path<String>,
) -> Result<Response, Failure> {
    let by = actor(caller);
    let path = format!("/api/v1/runs/{instance}/kill");
    let run = instance.clone();
    let answer = kill(&ctx.engine, |reply| ApiRequest::KillRun {
        instance,
        by,
        reply,
    })
    .await;
    kill_elsewhere(&ctx, answer, &run, path, &headers).await
}

async fn kill_machine(
    State(ctx): State<UiContext>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path((instance, machine)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let by = actor(caller);
    let path = format!("/api/v1/runs/{instance}/machines/{machine}/kill");
    let run = instance.clone();
    let answer = kill(&ctx.engine, |reply| ApiRequest::KillMachine {
        instance,
        machine,
        by,
        reply,
    })
    .await;
    kill_elsewhere(&ctx, answer, &run, path, &headers).await
}

/// A kill of a run this master does not have: with several masters, the run may be going on
/// another one, which the shared store names through the run's job.
async fn kill_elsewhere(
    ctx: &UiContext,
    answer: Result<Response, Failure>,
    instance: &str,
    path: String,
    headers: &HeaderMap,
) -> Result<Response, Failure> {
    let Err(Failure(StatusCode::NOT_FOUND, message)) = answer else {
        return answer;
    };
    let not_found = || Failure(StatusCode::NOT_FOUND, message.clone());
    let wanted = instance.to_owned();
    let stored = ctx
        .engine
        .ask(|reply| {
            ApiRequest::Store(Query::Run {
                instance: wanted,
                reply,
            })
        })
        .await
        .and_then(Result::ok)
        .flatten();
    let Some(run) = stored.filter(|r| r.ended.is_none()) else {
        return Err(not_found());
    };
    let job = run.job.clone();
    let holder = ctx
        .engine
        .ask(|reply| ApiRequest::HolderOf { job, reply })
        .await
        .flatten();
    if holder.is_none() {
        return Err(not_found());
    }
    Ok(elsewhere(ctx, &run.job, holder, path, headers).await)
}

/// Asks the engine for a kill and answers 202 once it has taken it.
async fn kill<E>(
    engine: &EngineHandle,
    request: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), E>>) -> ApiRequest,
) -> Result<Response, Failure>
where
    Failure: From<E>,
{
    engine.ask(request).await.ok_or_else(engine_gone)??;
    Ok((StatusCode::ACCEPTED, Json(json!({ "killing": true }))).into_response())
}
