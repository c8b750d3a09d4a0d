//! W3C trace context (<https://www.w3.org/TR/trace-context/>) carried from an input into
//! every output it produces, so that a trace follows a message through weir.
//!
//! An output's `traceparent` names the input's trace and a span of its own, a child of the
//! input's. That span id is derived from the input's dedup key and the output's index, never
//! drawn at random: an output re-published after a crash must be byte-identical to the first
//! publish, or JetStream's duplicate window and a downstream weir's dedup would see two
//! different messages. The input's `tracestate` goes along unchanged (weir adds no entry of
//! its own: it reports to no tracing vendor).

use sha2::{Digest, Sha256};

/// The W3C header that carries the trace id and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendors' trace data, passed on as it came.
pub const TRACESTATE: &str = "tracestate";

/// An input's trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The input's span: 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// The trace flags (bit 0: sampled), passed on to the outputs.
    pub flags: u8,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The trace context of a message with these headers, when it carries a valid
    /// `traceparent` (an invalid one is ignored, as the specification asks of a receiver).
    pub fn of(headers: &[(String, String)]) -> Option<TraceContext> {
        let first = |name: &str| {
            headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim())
        };
        let traceparent = first(TRACEPARENT)?;
        let (trace_id, parent_id, flags) = parse_traceparent(traceparent)?;
        Some(TraceContext {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags,
            tracestate: first(TRACESTATE)
                .filter(|state| !state.is_empty())
                .map(str::to_owned),
        })
    }

    /// The span id of output `index` of the input recorded under `dedup_key`.
    pub fn child_span_id(dedup_key: &str, index: usize) -> String {
        let digest = Sha256::new()
            .chain_update(b"weir-span\0")
            .chain_update(dedup_key.as_bytes())
            .chain_update(b"\0")
            // As 8 bytes whatever the platform's usize, for the same id on every host.
            .chain_update((index as u64).to_le_bytes())
            .finalize();
        let mut span = [0u8; 8];
        span.copy_from_slice(&digest[..8]);
        // An all-zero span id is invalid; one in 2^64 digests would give it.
        if span == [0; 8] {
            span[7] = 1;
        }
        span.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The headers output `index` of the input recorded under `dedup_key` carries.
    pub fn child_headers(&self, dedup_key: &str, index: usize) -> Vec<(String, String)> {
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            TraceContext::child_span_id(dedup_key, index),
            self.flags
        );
        let mut headers = vec![(TRACEPARENT.to_owned(), traceparent)];
        if let Some(state) = &self.tracestate {
            headers.push((TRACESTATE.to_owned(), state.clone()));
        }
        headers
    }
}

/// The trace id, parent id and flags of a `traceparent` value: version `00` exactly as the
/// specification writes it, or a later version's first four fields (it allows more after).
fn parse_traceparent(value: &str) -> Option<(&str, &str, u8)> {
    let lower_hex = |text: &str, len: usize| {
        text.len() == len
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let not_zero = |text: &str| text.bytes().any(|b| b != b'0');
    let version = value.get(..2)?;
    if !lower_hex(version, 2) || version == "ff" {
        return None;
    }
    match value.len() {
        55 => {}
        len if len > 55 && version != "00" && value.as_bytes()[55] == b'-' => {}
        _ => return None,
    }
    let fields = value.get(..55)?;
    let mut parts = fields.split('-');
    let (_, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if !(lower_hex(trace_id, 32) && lower_hex(parent_id, 16) && lower_hex(flags, 2)) {
        return None;
    }
    if !(not_zero(trace_id) && not_zero(parent_id)) {
        return None;
    }
    Some((trace_id, parent_id, u8::from_str_radix(flags, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn a_valid_traceparent_is_read_and_an_invalid_one_ignored() {
        let context = TraceContext::of(&headers(&[
            ("Traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]))
        .unwrap();
        assert_eq!(context.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id, "00f067aa0ba902b7");
        assert_eq!(context.flags, 1);
        assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // A later version may carry more fields.
        let later = format!("01{}-extra", &PARENT[2..]);
        assert!(TraceContext::of(&headers(&[("traceparent", &later)])).is_some());
        for invalid in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(
                TraceContext::of(&headers(&[("traceparent", invalid)])),
                None,
                "{invalid:?}"
            );
        }
        assert_eq!(TraceContext::of(&headers(&[("other", PARENT)])), None);
    }

    #[test]
    fn each_output_gets_a_child_span_derived_from_its_input_and_index() {
        let context = TraceContext::of(&headers(&[("traceparent", PARENT)])).unwrap();
        let first = context.child_headers("S@7#5", 0);
        assert_eq!(first.len(), 1, "no tracestate came in");
        let (name, value) = &first[0];
        assert_eq!(name, TRACEPARENT);
        let (trace_id, span_id, flags) = parse_traceparent(value).unwrap();
        assert_eq!((trace_id, flags), ("4bf92f3577b34da6a3ce929d0e0e4736", 1));
        assert_ne!(span_id, "00f067aa0ba902b7", "a span of its own");
        // The same input and index always give the same span; another of either, another.
        assert_eq!(context.child_headers("S@7#5", 0), first);
        assert_ne!(context.child_headers("S@7#5", 1), first);
        assert_ne!(context.child_headers("S@7#6", 0), first);
    }
}
