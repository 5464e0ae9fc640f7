//! Decoding is total: no input, however hostile, makes it panic.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use proptest::prelude::*;
use saltpeter_proto::{MasterMessage, WrapperMessage};

/// JSON-ish text built from the protocol's own vocabulary, so the generator reaches deep into
/// the decoders instead of failing at the first byte.
fn jsonish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"type\"",
        "\"output\"",
        "\"complete\"",
        "\"connect\"",
        "\"ack\"",
        "\"ack_type\"",
        "\"seq\"",
        "\"data\"",
        "\"job_name\"",
        "\"job_instance\"",
        "\"machine\"",
        "\"timestamp\"",
        "\"2025-12-23T09:31:46.1+00:00\"",
        "\"retcode\"",
        "-1",
        "0",
        "18446744073709551616",
        "1e999",
        "null",
        "true",
        "\"\\ud83d\"",
        "\"\\u0000\"",
        "\"x\"",
        "\"cause\"",
        "\"signal\"",
        "\"last_seq\"",
        " ",
    ]);
    prop::collection::vec(atoms, 0..64).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn wrapper_decode_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = WrapperMessage::decode(&text);
        let _ = MasterMessage::decode(&text);
    }

    #[test]
    fn decode_never_panics_on_jsonish(text in jsonish()) {
        if let Ok(msg) = WrapperMessage::decode(&text) {
            // Whatever decodes must survive its own round trip.
            prop_assert_eq!(WrapperMessage::decode(&msg.encode()).ok(), Some(msg));
        }
        if let Ok(msg) = MasterMessage::decode(&text) {
            prop_assert_eq!(MasterMessage::decode(&msg.encode()).ok(), Some(msg));
        }
    }
}

/// RFC 3339 text near the edges of what `time` represents: years 0000 and 9999, offsets up to
/// ±23:59, so converting to UTC can leave the range.
fn edge_timestamp() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![0u32, 1, 1970, 2025, 9998, 9999]),
        1u32..=12,
        1u32..=31,
        0u32..=23,
        0u32..=59,
        0u32..=60,
        prop::sample::select(vec!['+', '-']),
        0u32..=23,
        0u32..=59,
        prop::bool::ANY,
    )
        .prop_map(|(y, mo, d, h, mi, s, sign, oh, om, zulu)| {
            let offset = if zulu {
                "Z".to_owned()
            } else {
                format!("{sign}{oh:02}:{om:02}")
            };
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.5{offset}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn timestamps_at_the_edges_of_the_range_never_panic(text in edge_timestamp()) {
        if let Ok(ts) = saltpeter_proto::Timestamp::parse(&text) {
            // What parses is printable and parses back to itself.
            let again = saltpeter_proto::Timestamp::parse(&ts.to_string()).ok();
            prop_assert_eq!(again, Some(ts));
        }
        let frame = format!(
            r#"{{"type":"heartbeat","job_name":"j","job_instance":"j_1","machine":"m","timestamp":"{text}"}}"#
        );
        let _ = WrapperMessage::decode(&frame);
    }
}
