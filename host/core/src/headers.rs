//! Message headers as NATS carries them: whose namespace a name is in, which names and values
//! the wire can carry, and how many bytes a header block takes.

/// The header that carries a message's deduplication id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The largest header block JetStream stores (`NATS/1.0` line, every header, the blank
/// line): nats-server refuses a longer one with error 10097, "header size exceeds maximum
/// allowed of 64k", and will refuse it on every retry.
pub const MAX_HEADER_BLOCK: usize = u16::MAX as usize;

/// Headers in NATS's namespace, which JetStream interprets (expected sequences, rollups,
/// TTLs, batches).
pub fn is_nats_header(name: &str) -> bool {
    has_prefix_ignoring_case(name, "Nats-")
}

/// Headers in weir's namespace, which dead letters and replays carry: no plugin output and
/// no input's own header may set one.
pub fn is_weir_header(name: &str) -> bool {
    has_prefix_ignoring_case(name, "Weir-")
}

fn has_prefix_ignoring_case(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

/// Whether `name` can be a header name on the wire: printable ASCII without `:`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Whether `value` can be a header value that reads back as written: no control characters
/// (a CR or LF would end the header line, and the rest would become headers of its own) and
/// no surrounding whitespace (which readers trim).
pub fn is_valid_value(value: &str) -> bool {
    !value.chars().any(char::is_control) && value.trim() == value
}

/// The bytes of a header block: `NATS/1.0\r\n`, one `name: value\r\n` per header, `\r\n`.
pub fn block_len<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    const LINE_END: usize = 2;
    const SEPARATOR: usize = 2; // ": "
    let lines: usize = headers
        .into_iter()
        .map(|(name, value)| name.len() + SEPARATOR + value.len() + LINE_END)
        .sum();
    "NATS/1.0".len() + LINE_END + lines + LINE_END
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_ignore_case() {
        assert!(is_nats_header("nats-rollup") && is_nats_header("Nats-Msg-Id"));
        assert!(is_weir_header("WEIR-Dlq-Kind") && !is_weir_header("Weird"));
        assert!(!is_nats_header("Nat") && !is_nats_header(""));
    }

    #[test]
    fn names_and_values_the_wire_cannot_carry_are_refused() {
        assert!(is_valid_name("Content-Type"));
        for name in ["", "a b", "a:b", "é", "a\tb"] {
            assert!(!is_valid_name(name), "{name:?}");
        }
        assert!(is_valid_value("") && is_valid_value("a b ✓"));
        for value in ["a\rb", "a\nb", "\u{1b}[31m", " padded", "tab\t"] {
            assert!(!is_valid_value(value), "{value:?}");
        }
    }

    #[test]
    fn block_len_counts_every_line() {
        assert_eq!(block_len([]), "NATS/1.0\r\n\r\n".len());
        assert_eq!(block_len([("a", "bc")]), "NATS/1.0\r\na: bc\r\n\r\n".len());
    }
}
