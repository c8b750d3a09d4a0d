//! NATS subject syntax: which strings are subjects, and which subjects a filter matches.
//!
//! Used to validate the configuration (an output prefix the input filter matches would feed
//! a pipeline its own outputs) and the subjects plugins ask to publish on.

/// Whether `subject` is a literal subject a message can be published on: non-empty tokens
/// separated by `.`, without wildcards or whitespace.
pub fn is_literal(subject: &str) -> bool {
    !subject.is_empty() && subject.split('.').all(is_literal_token)
}

/// Whether `filter` is a valid subscription filter: like a literal subject, but a token may
/// be `*`, and the last token may be `>`.
pub fn is_filter(filter: &str) -> bool {
    let tokens: Vec<&str> = filter.split('.').collect();
    !filter.is_empty()
        && tokens.iter().enumerate().all(|(index, token)| {
            *token == "*" || (*token == ">" && index == tokens.len() - 1) || is_literal_token(token)
        })
}

/// Whether the literal `subject` matches `filter`.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for filter_token in filter.split('.') {
        match (filter_token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(token)) if literal == token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether some subject matches both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    let (mut a_tokens, mut b_tokens) = (a.split('.'), b.split('.'));
    loop {
        match (a_tokens.next(), b_tokens.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn is_literal_token(token: &str) -> bool {
    !token.is_empty()
        && token != "*"
        && token != ">"
        && !token.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_subjects() {
        assert!(is_literal("orders"));
        assert!(is_literal("orders.out.customer-1"));
        for bad in [
            "", "orders.", ".orders", "a..b", "a.*", "a.>", "a b", "a\tb",
        ] {
            assert!(!is_literal(bad), "{bad:?} is not a literal subject");
        }
    }

    #[test]
    fn filters() {
        assert!(is_filter("orders.>"));
        assert!(is_filter("orders.*.created"));
        assert!(is_filter(">"));
        assert!(!is_filter("orders.>.x"));
        assert!(!is_filter("orders..x"));
        assert!(!is_filter(""));
    }

    #[test]
    fn overlapping() {
        assert!(overlaps("orders.in.>", "orders.>"));
        assert!(overlaps("orders.*.x", "orders.in.*"));
        assert!(overlaps("a.b", "a.b"));
        assert!(!overlaps("orders.in.>", "orders.out.>"));
        assert!(!overlaps("a.b", "a.b.c"));
        assert!(!overlaps("a.*", "a.b.c"));
    }

    #[test]
    fn matching() {
        assert!(matches("orders.>", "orders.a.b"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches("orders.*", "orders.a"));
        assert!(!matches("orders.*", "orders.a.b"));
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders.a"));
        assert!(matches(">", "x"));
        assert!(!matches("a.b", "a"));
    }
}
