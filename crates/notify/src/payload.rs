//! What each channel receives for an [`Alert`]: a webhook's JSON body (documented in
//! docs/DEPLOY.md, so receivers can rely on its fields), a Slack or Mattermost message, and a
//! mail's subject and text.
//!
//! Every body is bounded whatever the fleet's size: a webhook lists at most
//! [`MAX_WEBHOOK_MACHINES`] machines (and says how many it left out), a chat message and a mail
//! at most [`MAX_CHAT_LINES`] and [`MAX_MAIL_LINES`] failed machines, and long free text is cut.

use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;

use crate::{Alert, NotifyOn};

/// Machines a webhook body lists; `machines_omitted` counts the rest.
pub const MAX_WEBHOOK_MACHINES: usize = 1000;
/// Failed machines a Slack message names.
pub const MAX_CHAT_LINES: usize = 20;
/// Failed machines a mail names.
pub const MAX_MAIL_LINES: usize = 1000;
/// Longest free text (`detail`, `link`, a machine's name or cause) taken into a body.
pub const MAX_FIELD: usize = 2048;

/// `text` cut to at most [`MAX_FIELD`] bytes, on a character boundary.
fn cut(text: &str) -> &str {
    if text.len() <= MAX_FIELD {
        return text;
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

fn rfc3339(at: time::OffsetDateTime) -> Value {
    at.format(&Rfc3339).map_or(Value::Null, Value::String)
}

/// The webhook's JSON body. Its bytes are what the signature covers.
pub fn webhook_body(alert: &Alert) -> Vec<u8> {
    let machines: Vec<Value> = alert
        .machines
        .iter()
        .take(MAX_WEBHOOK_MACHINES)
        .map(|m| json!({"machine": cut(&m.machine), "code": m.code, "cause": cut(&m.cause)}))
        .collect();
    let body = json!({
        "id": alert.idempotency_key(),
        "event": alert.event.name(),
        "job": alert.job,
        "instance": alert.instance,
        "at": rfc3339(alert.at),
        "slot": alert.slot.map(rfc3339),
        "machines": machines,
        "machines_omitted": alert.machines.len().saturating_sub(MAX_WEBHOOK_MACHINES),
        "failed": alert.failed().count(),
        "total": alert.machines.len(),
        "detail": alert.detail.as_deref().map(cut),
        "link": alert.link.as_deref().map(cut),
    });
    body.to_string().into_bytes()
}

/// One line that says what happened, for chat and mail subjects.
pub fn headline(alert: &Alert) -> String {
    let run = alert.instance.as_deref().unwrap_or("no run");
    match alert.event {
        NotifyOn::Failure => format!(
            "saltpeter: {} failed on {} of {} machines ({run})",
            alert.job,
            alert.failed().count(),
            alert.machines.len()
        ),
        NotifyOn::Recovery => format!("saltpeter: {} recovered ({run})", alert.job),
        NotifyOn::Missed => format!(
            "saltpeter: {} missed its slot {}",
            alert.job,
            alert
                .slot
                .and_then(|s| s.format(&Rfc3339).ok())
                .unwrap_or_default()
        ),
        NotifyOn::RunningTooLong => format!("saltpeter: {} is still running ({run})", alert.job),
    }
}

/// The lines under the headline: each failed machine with its code and cause (at most
/// `max`, then how many more), the detail, the link.
pub fn details(alert: &Alert, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = alert
        .failed()
        .take(max)
        .map(|m| format!("{}: {} ({})", cut(&m.machine), m.code, cut(&m.cause)))
        .collect();
    let more = alert.failed().count().saturating_sub(max);
    if more > 0 {
        lines.push(format!("... and {more} more"));
    }
    lines.extend(alert.detail.as_deref().map(|d| cut(d).to_owned()));
    lines.extend(alert.link.as_deref().map(|l| cut(l).to_owned()));
    lines
}

/// A Slack or Mattermost incoming-webhook body.
pub fn slack_body(alert: &Alert) -> Vec<u8> {
    let mut text = headline(alert);
    for line in details(alert, MAX_CHAT_LINES) {
        text.push('\n');
        text.push_str(&line);
    }
    json!({ "text": text }).to_string().into_bytes()
}

/// A mail's subject and plain-text body.
pub fn mail(alert: &Alert) -> (String, String) {
    let mut body = String::new();
    for line in details(alert, MAX_MAIL_LINES) {
        body.push_str(&line);
        body.push('\n');
    }
    body.push_str(&format!("\nid {}\n", alert.idempotency_key()));
    (headline(alert), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineResult;
    use crate::tests::failure;

    #[test]
    fn the_webhook_body_names_event_job_run_results_and_link() {
        let body: Value = serde_json::from_slice(&webhook_body(&failure())).unwrap_or_default();
        assert_eq!(body["event"], "failure");
        assert_eq!(body["job"], "backup");
        assert_eq!(body["instance"], "backup_1796522311");
        assert_eq!(body["at"], "2026-12-06T02:00:00Z");
        assert_eq!(body["failed"], 1);
        assert_eq!(body["total"], 2);
        assert_eq!(body["machines"][1]["code"], 253);
        assert_eq!(body["machines"][1]["cause"], "heartbeat_lost");
        assert_eq!(body["id"], failure().idempotency_key());
        assert!(
            body["link"]
                .as_str()
                .is_some_and(|l| l.contains("backup_1796522311"))
        );
    }

    #[test]
    fn chat_and_mail_say_what_failed_where() {
        let slack: Value = serde_json::from_slice(&slack_body(&failure())).unwrap_or_default();
        let text = slack["text"].as_str().unwrap_or_default();
        assert!(text.starts_with("saltpeter: backup failed on 1 of 2 machines"));
        assert!(text.contains("db2: 253 (heartbeat_lost)"));
        assert!(!text.contains("db1"));
        let (subject, body) = mail(&failure());
        assert!(subject.contains("backup failed"));
        assert!(body.contains("db2: 253 (heartbeat_lost)"));
        let mut missed = failure();
        missed.event = NotifyOn::Missed;
        missed.instance = None;
        missed.slot = Some(time::macros::datetime!(2026-12-06 01:00:00 UTC));
        assert_eq!(
            headline(&missed),
            "saltpeter: backup missed its slot 2026-12-06T01:00:00Z"
        );
    }

    #[test]
    fn bodies_stay_bounded_for_a_huge_fleet() {
        let mut alert = failure();
        alert.machines = (0..20_000)
            .map(|i| MachineResult {
                machine: format!("m{i}"),
                code: 255,
                cause: "error".into(),
            })
            .collect();
        alert.detail = Some("é".repeat(10_000));
        let body: Value = serde_json::from_slice(&webhook_body(&alert)).unwrap_or_default();
        assert_eq!(
            body["machines"].as_array().map(Vec::len),
            Some(MAX_WEBHOOK_MACHINES)
        );
        assert_eq!(body["machines_omitted"], 19_000);
        assert_eq!(body["failed"], 20_000);
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.len() <= MAX_FIELD)
        );
        assert!(webhook_body(&alert).len() < 128 * 1024);
        let slack: Value = serde_json::from_slice(&slack_body(&alert)).unwrap_or_default();
        let text = slack["text"].as_str().unwrap_or_default();
        assert!(text.contains("... and 19980 more"), "{text}");
        assert!(mail(&alert).1.len() < 64 * 1024);
    }
}
