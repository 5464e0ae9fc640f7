//! The webhook signature: `X-Saltpeter-Signature: sha256=<hex HMAC-SHA256 of the raw body>`,
//! keyed with the rule's secret, as GitHub signs its webhooks. A receiver recomputes the HMAC
//! over the bytes it received and compares in constant time.

/// The header's name.
pub const HEADER: &str = "X-Saltpeter-Signature";

/// The header's value for `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Whether `header` is the signature of `body` under `secret` (for receivers and tests).
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = decode_hex(hex) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &tag).is_ok()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_vector_and_a_round_trip() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let header = signature("s3cret", br#"{"event":"failure"}"#);
        assert!(verify("s3cret", br#"{"event":"failure"}"#, &header));
        assert!(!verify("s3cret", br#"{"event":"recovery"}"#, &header));
        assert!(!verify("other", br#"{"event":"failure"}"#, &header));
        assert!(!verify("s3cret", b"x", "sha1=00"));
        assert!(!verify("s3cret", b"x", "sha256=zz"));
        assert!(!verify("s3cret", b"x", "sha256=abc"));
    }
}
