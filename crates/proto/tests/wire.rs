//! The wire contract: every golden message of the original protocol decodes, re-encodes
//! without losing a field, and every message shape is snapshotted so a change shows in review.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};

use saltpeter_proto::*;
use serde_json::Value;

/// The fixture files: the copy vendored in this crate, plus the shared originals when the
/// checkout sits beside them (as in CI), so a drift between the two fails here.
fn fixture_files(name: &str) -> Vec<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![here.join("tests/fixtures").join(name)];
    let shared = here.join("../../../shared/fixtures/wire").join(name);
    if shared.exists() {
        files.push(shared);
    }
    files
}

fn lines(name: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in fixture_files(name) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push((format!("{}:{}", file.display(), i + 1), line.to_owned()));
        }
    }
    assert!(out.len() >= 10, "fixtures for {name} are missing");
    out
}

/// Compares a decoded-and-re-encoded message with its original: every field present in the
/// original must be present with the same value; timestamps compare as instants.
fn assert_keeps_every_field(place: &str, original: &Value, reencoded: &Value) {
    let (Value::Object(orig), Value::Object(re)) = (original, reencoded) else {
        panic!("{place}: not an object");
    };
    for (key, value) in orig {
        let Some(got) = re.get(key) else {
            panic!("{place}: field {key:?} lost on re-encode");
        };
        if key == "timestamp" {
            let a = Timestamp::parse(value.as_str().unwrap()).unwrap();
            let b = Timestamp::parse(got.as_str().unwrap()).unwrap();
            assert_eq!(a, b, "{place}: timestamp changed");
        } else {
            assert_eq!(value, got, "{place}: field {key:?} changed");
        }
    }
    for key in re.keys() {
        assert!(
            orig.contains_key(key) || key == "stream",
            "{place}: re-encode invented field {key:?}"
        );
    }
}

#[test]
fn every_wrapper_fixture_decodes_and_round_trips() {
    for (place, line) in lines("wrapper-to-master.jsonl") {
        let msg = WrapperMessage::decode(&line).unwrap_or_else(|e| panic!("{place}: {e}"));
        let original: Value = serde_json::from_str(&line).unwrap();
        let reencoded: Value = serde_json::from_str(&msg.encode()).unwrap();
        assert_keeps_every_field(&place, &original, &reencoded);
        assert_eq!(
            WrapperMessage::decode(&msg.encode()).unwrap(),
            msg,
            "{place}"
        );
    }
}

#[test]
fn every_master_fixture_decodes_and_round_trips() {
    for (place, line) in lines("master-to-wrapper.jsonl") {
        let msg = MasterMessage::decode(&line).unwrap_or_else(|e| panic!("{place}: {e}"));
        let original: Value = serde_json::from_str(&line).unwrap();
        let reencoded: Value = serde_json::from_str(&msg.encode()).unwrap();
        assert_keeps_every_field(&place, &original, &reencoded);
        assert_eq!(
            MasterMessage::decode(&msg.encode()).unwrap(),
            msg,
            "{place}"
        );
    }
}

#[test]
fn awkward_originals_decode_to_what_they_mean() {
    let complete_without_retcode = r#"{"type":"complete","job_name":"j","job_instance":"j_1","machine":"m","timestamp":"2025-12-23T09:32:10.441002+00:00"}"#;
    let WrapperMessage::Complete(c) = WrapperMessage::decode(complete_without_retcode).unwrap()
    else {
        panic!("not a complete");
    };
    assert_eq!(c.retcode, None);

    let no_timestamp = r#"{"type":"heartbeat","job_name":"j","job_instance":"j_1","machine":"m"}"#;
    let msg = WrapperMessage::decode(no_timestamp).unwrap();
    assert_eq!(msg.envelope().timestamp, None);
    assert_eq!(msg.kind(), "heartbeat");

    let negative = r#"{"type":"complete","job_name":"j","job_instance":"j_1","machine":"m","retcode":-15,"seq":4}"#;
    let WrapperMessage::Complete(c) = WrapperMessage::decode(negative).unwrap() else {
        panic!("not a complete");
    };
    assert_eq!((c.retcode, c.seq), (Some(-15), Some(4)));
}

#[test]
fn unknown_fields_and_unknown_enum_values_are_tolerated() {
    let line = r#"{"type":"connect","job_name":"j","job_instance":"j_1","machine":"m","future":{"x":1},"protocol":3}"#;
    let WrapperMessage::Connect(c) = WrapperMessage::decode(line).unwrap() else {
        panic!("not a connect");
    };
    assert_eq!(c.protocol, Some(3));
    let ack = r#"{"type":"ack","ack_type":"telepathy","extra":true}"#;
    let MasterMessage::Ack(a) = MasterMessage::decode(ack).unwrap() else {
        panic!("not an ack")
    };
    assert_eq!(a.ack_type, AckType::Unknown);
    let err = r#"{"type":"error","code":"RATE_LIMITED","message":"slow down"}"#;
    let MasterMessage::Error(e) = MasterMessage::decode(err).unwrap() else {
        panic!("not an error")
    };
    assert_eq!(e.code, ErrorCode::Unknown);
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    for bad in [
        "",
        "null",
        "[]",
        "{}",
        r#"{"type":"output"}"#,
        r#"{"type":"output","job_name":"j","job_instance":"i","machine":"m","data":"x","seq":-1}"#,
        r#"{"type":"start","job_name":"j","job_instance":"i","machine":"m","pid":"12","version":"1"}"#,
        r#"{"type":"heartbeat","job_name":"j","job_instance":"i","machine":"m","timestamp":"noon"}"#,
        r#"{"type":"teleport","job_name":"j","job_instance":"i","machine":"m"}"#,
        "{\"type\":\"heartbeat\",\"job_name\":\"\u{0}",
    ] {
        assert!(
            WrapperMessage::decode(bad).is_err(),
            "{bad:?} should not decode"
        );
    }
}

/// One example of every message shape in both directions, with our extensions filled in.
fn every_shape() -> Vec<(&'static str, String)> {
    let at = Timestamp::parse("2026-01-02T03:04:05.678901+00:00").unwrap();
    let env = Envelope {
        job_name: "backup".into(),
        job_instance: "backup_1767323045".into(),
        machine: "db01".into(),
        timestamp: Some(at),
    };
    let w = |m: WrapperMessage| m.encode();
    let m = |m: MasterMessage| m.encode();
    vec![
        (
            "connect",
            w(WrapperMessage::Connect(Connect {
                envelope: env.clone(),
                protocol: Some(PROTOCOL_VERSION),
                token: Some("s3cret".into()),
                signature: None,
                wrapper_pid: Some(4242),
            })),
        ),
        (
            "hello",
            w(WrapperMessage::Hello(Hello {
                envelope: env.clone(),
                protocol: Some(PROTOCOL_VERSION),
            })),
        ),
        (
            "connect_signed",
            w(WrapperMessage::Connect(Connect {
                envelope: env.clone(),
                protocol: Some(PROTOCOL_VERSION),
                token: Some("s3cret".into()),
                signature: Some("c2lnbmF0dXJl".into()),
                wrapper_pid: Some(4242),
            })),
        ),
        (
            "start",
            w(WrapperMessage::Start(Start {
                envelope: env.clone(),
                pid: 4243,
                version: "0.1.0".into(),
            })),
        ),
        (
            "heartbeat",
            w(WrapperMessage::Heartbeat(Heartbeat {
                envelope: env.clone(),
            })),
        ),
        (
            "output",
            w(WrapperMessage::Output(Output {
                envelope: env.clone(),
                stream: "stdout".into(),
                data: "caf\u{e9} \u{1F680}\r\n".into(),
                seq: Some(7),
            })),
        ),
        (
            "sync_request",
            w(WrapperMessage::SyncRequest(SyncRequest {
                envelope: env.clone(),
                last_acked_seq: 6,
                next_seq: 8,
            })),
        ),
        (
            "complete",
            w(WrapperMessage::Complete(Complete {
                envelope: env.clone(),
                retcode: Some(137),
                seq: Some(8),
                cause: Some(Cause::Signal),
                signal: Some(9),
            })),
        ),
        (
            "wrapper_error",
            w(WrapperMessage::Error(WrapperError {
                envelope: env.clone(),
                error: "boom".into(),
            })),
        ),
        (
            "killed",
            w(WrapperMessage::Killed(Killed {
                envelope: env.clone(),
            })),
        ),
        (
            "ack_connect",
            m(MasterMessage::Ack(Ack {
                ack_type: AckType::Connect,
                seq: None,
                last_seq: Some(-1),
                timestamp: Some(at),
            })),
        ),
        (
            "ack_output",
            m(MasterMessage::Ack(Ack {
                ack_type: AckType::Output,
                seq: Some(7),
                last_seq: None,
                timestamp: Some(at),
            })),
        ),
        (
            "nack",
            m(MasterMessage::Nack(Nack {
                nack_type: NackType::OutOfOrder,
                expected_seq: 3,
                received_seq: 5,
                timestamp: Some(at),
            })),
        ),
        (
            "sync_response",
            m(MasterMessage::SyncResponse(SyncResponse {
                last_seq: -1,
                timestamp: Some(at),
            })),
        ),
        (
            "kill",
            m(MasterMessage::Kill(Kill {
                job_name: env.job_name.clone(),
                job_instance: env.job_instance.clone(),
                machine: env.machine.clone(),
                timestamp: Some(at),
            })),
        ),
        (
            "challenge",
            m(MasterMessage::Challenge(Challenge {
                nonce: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                timestamp: Some(at),
            })),
        ),
        (
            "error_job_not_found",
            m(MasterMessage::Error(ErrorReply::job_not_found())),
        ),
        (
            "error_unauthorized",
            m(MasterMessage::Error(ErrorReply {
                code: ErrorCode::Unauthorized,
                message: "bad token".into(),
                timestamp: None,
            })),
        ),
        (
            "error_not_holder",
            m(MasterMessage::Error(ErrorReply::not_holder("backup"))),
        ),
    ]
}

#[test]
fn not_holder_is_its_own_code_and_readable_as_unknown_by_a_decoder_without_it() {
    let line = r#"{"type":"error","code":"NOT_HOLDER","message":"elsewhere"}"#;
    let MasterMessage::Error(e) = MasterMessage::decode(line).unwrap() else {
        panic!("not an error")
    };
    assert_eq!(e.code, ErrorCode::NotHolder);
    let reply = ErrorReply::not_holder("nightly \"db\"");
    assert_eq!(reply.code, ErrorCode::NotHolder);
    assert!(
        reply.message.contains("nightly") && reply.message.contains("another master"),
        "{}",
        reply.message
    );
    // A decoder that predates the code, like ours for any code it does not know, must still
    // read the frame as an error rather than reject it.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    enum OldCode {
        JobNotFound,
        Unauthorized,
        BadRequest,
        #[serde(other)]
        Unknown,
    }
    #[derive(serde::Deserialize)]
    struct OldError {
        code: OldCode,
    }
    let encoded = MasterMessage::Error(reply).encode();
    let old: OldError = serde_json::from_str(&encoded).unwrap();
    assert_eq!(old.code, OldCode::Unknown);
}

/// The identity extension's messages, one JSON object per line, in both directions.
#[test]
fn identity_fixtures_decode_and_round_trip() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/identity.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut seen = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let place = format!("{}:{}", file.display(), i + 1);
        let original: Value = serde_json::from_str(line).unwrap();
        let reencoded: Value = match WrapperMessage::decode(line) {
            Ok(msg) => {
                seen.push(msg.kind().to_owned());
                serde_json::from_str(&msg.encode()).unwrap()
            }
            Err(_) => {
                let msg = MasterMessage::decode(line).unwrap_or_else(|e| panic!("{place}: {e}"));
                seen.push(
                    format!("{msg:?}")
                        .chars()
                        .take_while(|c| c.is_alphanumeric())
                        .collect(),
                );
                serde_json::from_str(&msg.encode()).unwrap()
            }
        };
        assert_keeps_every_field(&place, &original, &reencoded);
    }
    assert_eq!(seen, ["hello", "Challenge", "connect"]);
}

#[test]
fn the_signing_payload_binds_nonce_instance_and_machine_unambiguously() {
    let p = signing_payload("n0nce", "backup_1767323045", "db01");
    assert_eq!(
        String::from_utf8(p).unwrap(),
        "saltpeter connect signature v1\n5:n0nce\n17:backup_1767323045\n4:db01\n"
    );
    // Moving characters between fields changes the bytes.
    assert_ne!(
        signing_payload("n", "j_1", "ab"),
        signing_payload("n", "j_1a", "b")
    );
    assert_ne!(
        signing_payload("n", "j_1", "a\n"),
        signing_payload("n", "j_1\n", "a")
    );
}

#[test]
fn message_shapes_are_snapshotted() {
    for (name, json) in every_shape() {
        let value: Value = serde_json::from_str(&json).unwrap();
        insta::assert_json_snapshot!(name, value);
    }
}

#[test]
fn emitted_timestamps_use_plus_zero_and_microseconds() {
    let at = Timestamp::parse("2026-01-02T03:04:05Z").unwrap();
    let json = MasterMessage::Ack(Ack {
        ack_type: AckType::Start,
        seq: None,
        last_seq: None,
        timestamp: Some(at),
    })
    .encode();
    assert!(
        json.contains("\"2026-01-02T03:04:05.000000+00:00\""),
        "{json}"
    );
}
