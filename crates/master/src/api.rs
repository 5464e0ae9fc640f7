//! The HTTP API (default 127.0.0.1:8888): JSON, RFC 3339 times, errors as
//! `{"error": "..."}` with a 4xx/5xx status. Every handler asks the engine and renders its
//! answer; the API holds no run state of its own.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::engine::{ApiError, ApiRequest, EngineHandle};

/// The API's router.
pub fn router(engine: EngineHandle) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{job}/run", post(run_now))
        .route("/api/v1/runs/{instance}", get(get_run))
        .route("/api/v1/runs/{instance}/kill", post(kill_run))
        .route(
            "/api/v1/runs/{instance}/machines/{machine}/kill",
            post(kill_machine),
        )
        .with_state(engine)
}

/// An error response.
#[derive(Debug)]
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(m) => Failure(StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => Failure(StatusCode::CONFLICT, m),
        }
    }
}

fn engine_gone() -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "the master is shutting down".into(),
    )
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
    State(engine): State<EngineHandle>,
    Path(job): Path<String>,
) -> Result<Response, Failure> {
    let instance = engine
        .ask(|reply| ApiRequest::RunNow { job, reply })
        .await
        .ok_or_else(engine_gone)??;
    Ok((StatusCode::ACCEPTED, Json(json!({ "instance": instance }))).into_response())
}

async fn get_run(
    State(engine): State<EngineHandle>,
    Path(instance): Path<String>,
) -> Result<Response, Failure> {
    let wanted = instance.clone();
    let run = engine
        .ask(|reply| ApiRequest::GetRun { instance, reply })
        .await
        .ok_or_else(engine_gone)?
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no run {wanted:?}")))?;
    Ok(Json(run).into_response())
}

async fn kill_run(
    State(engine): State<EngineHandle>,
    Path(instance): Path<String>,
) -> Result<Response, Failure> {
    engine
        .ask(|reply| ApiRequest::KillRun { instance, reply })
        .await
        .ok_or_else(engine_gone)??;
    Ok((StatusCode::ACCEPTED, Json(json!({ "killing": true }))).into_response())
}

async fn kill_machine(
    State(engine): State<EngineHandle>,
    Path((instance, machine)): Path<(String, String)>,
) -> Result<Response, Failure> {
    engine
        .ask(|reply| ApiRequest::KillMachine {
            instance,
            machine,
            reply,
        })
        .await
        .ok_or_else(engine_gone)??;
    Ok((StatusCode::ACCEPTED, Json(json!({ "killing": true }))).into_response())
}
