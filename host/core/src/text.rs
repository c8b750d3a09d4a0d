//! Text a plugin or a producer controls, made safe for a log line, a header or a terminal.

/// `text` with every control character escaped (`\n`, `\r`, `\u{1b}`, …), so that it can
/// neither end a log line or header early nor send escape sequences to a terminal, and cut
/// to at most `max_bytes` (at a character boundary, marked with `…`).
pub fn escaped(text: &str, max_bytes: usize) -> String {
    const CUT_MARK: char = '…';
    let mut out = String::with_capacity(text.len().min(max_bytes));
    for c in text.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max_bytes {
            out.truncate(before);
            while out.len() + CUT_MARK.len_utf8() > max_bytes && !out.is_empty() {
                let last = out.pop();
                debug_assert!(last.is_some());
            }
            if max_bytes >= CUT_MARK.len_utf8() {
                out.push(CUT_MARK);
            }
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_is_bounded() {
        assert_eq!(
            escaped("a\nERROR weir: forged\r\u{1b}[31m", 100),
            "a\\nERROR weir: forged\\r\\u{1b}[31m"
        );
        let long = "x".repeat(10_000);
        let cut = escaped(&long, 64);
        assert!(cut.len() <= 64 && cut.ends_with('…'), "{cut}");
        // An escape is never cut in half.
        let cut = escaped("ab\u{1b}", 5);
        assert!(cut.len() <= 5 && !cut.contains('\\'), "{cut:?}");
        assert_eq!(escaped("ééé", 4), "…");
    }
}
