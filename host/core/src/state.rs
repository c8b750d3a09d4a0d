//! A stateful pipeline's keyed state: which key an input's state is under, the entries of
//! one key, and the view a plugin call reads and changes them through.
//!
//! The state of a key is what the inputs of that key before this one, in stream order, left:
//! the pipeline runs a key's inputs one after another (in waves, one input per key each, so
//! that different keys still run in parallel), applies a call's changes only when its input
//! is transformed (a dead-lettered input changes nothing), and commits a batch's changes in
//! the same synced write as its dedup records. A redelivered input is found in the store and
//! not run again, so its changes never apply twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::input::Input;

/// The most entry names one `list` returns.
pub const MAX_LISTED: usize = 1000;

/// Which part of an input names its state key (`[pipeline.state] key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKeyRule {
    /// `subject-token:N`: the subject's Nth token, counted from 1 (as NATS's subject
    /// mappings count wildcards).
    SubjectToken(usize),
    /// `header:Name`: the first value of header `Name`.
    Header(String),
}

impl StateKeyRule {
    /// Reads the configuration's spelling: `subject-token:3` or `header:Account`.
    pub fn parse(text: &str) -> Result<StateKeyRule, String> {
        let expected = "expected \"subject-token:N\" (N from 1) or \"header:Name\"";
        match text.split_once(':') {
            Some(("subject-token", token)) => match token.parse::<usize>() {
                Ok(token) if token >= 1 => Ok(StateKeyRule::SubjectToken(token)),
                _ => Err(format!("{text:?} names no subject token: {expected}")),
            },
            Some(("header", name)) if crate::headers::is_valid_name(name) && !name.is_empty() => {
                Ok(StateKeyRule::Header(name.to_owned()))
            }
            Some(("header", name)) => Err(format!(
                "{text:?}: {name:?} is not a header name NATS can carry; {expected}"
            )),
            _ => Err(format!("{text:?}: {expected}")),
        }
    }

    /// The state key of `input`, or why it has none (the input is dead-lettered as
    /// invalid: it cannot be run in order with the inputs of its key).
    pub fn key_of(&self, input: &Input) -> Result<String, String> {
        match self {
            StateKeyRule::SubjectToken(token) => input
                .subject
                .split('.')
                .nth(token - 1)
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!("its subject has no token {token}, which [pipeline.state] key names")
                }),
            StateKeyRule::Header(name) => match input.header(name) {
                Some(value) if !value.is_empty() => Ok(value.to_owned()),
                _ => Err(format!(
                    "it has no header {name}, which [pipeline.state] key names"
                )),
            },
        }
    }
}

/// How much state a key may hold (`[pipeline.state]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// One entry's name and value.
    pub max_entry_bytes: usize,
    /// All of a key's entries' names and values together.
    pub max_key_bytes: usize,
}

impl Default for StateLimits {
    fn default() -> StateLimits {
        StateLimits {
            max_entry_bytes: 64 << 10,
            max_key_bytes: 1 << 20,
        }
    }
}

/// A stateful pipeline's state: where an input's key comes from, and its limits.
#[derive(Debug, Clone)]
pub struct StateSettings {
    pub key: StateKeyRule,
    pub limits: StateLimits,
}

/// The entries of one state key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyState {
    entries: BTreeMap<String, Vec<u8>>,
    /// Names and values together: what `max_key_bytes` bounds.
    bytes: usize,
}

/// Changes to one key's entries: a value set, or `None` for an entry deleted.
pub type StateChanges = BTreeMap<String, Option<Vec<u8>>>;

impl KeyState {
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> KeyState {
        let entries: BTreeMap<String, Vec<u8>> = entries.into_iter().collect();
        let bytes = entries
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        KeyState { entries, bytes }
    }

    pub fn entries(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.entries
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The key's entries as a partitioned pipeline commits them, in a message of the output
    /// stream: for each entry in name order, the name's length (4 bytes, big-endian), the
    /// name, the value's length, the value. Simple enough for any reader to decode.
    pub fn encode(&self) -> Vec<u8> {
        let mut encoded = Vec::with_capacity(self.encoded_len());
        for (name, value) in &self.entries {
            for part in [name.as_bytes(), value] {
                encoded.extend_from_slice(&(part.len() as u32).to_be_bytes());
                encoded.extend_from_slice(part);
            }
        }
        encoded
    }

    /// The length of [`KeyState::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        self.bytes + 8 * self.entries.len()
    }

    /// The length of [`KeyState::encode`]'s bytes once `changes` are applied, without
    /// applying them (a change the limits refuse must not cost a copy of the state).
    pub fn encoded_len_after(&self, changes: &StateChanges) -> usize {
        let (mut added, mut removed) = (0, 0);
        for (name, change) in changes {
            if let Some(old) = self.entries.get(name) {
                removed += 8 + name.len() + old.len();
            }
            if let Some(value) = change {
                added += 8 + name.len() + value.len();
            }
        }
        self.encoded_len() + added - removed
    }

    /// Reads what [`KeyState::encode`] wrote.
    pub fn decode(mut bytes: &[u8]) -> Result<KeyState, String> {
        let mut entries = Vec::new();
        while !bytes.is_empty() {
            let name = String::from_utf8(take_part(&mut bytes, "name")?)
                .map_err(|_| "an entry's name is not UTF-8".to_owned())?;
            entries.push((name, take_part(&mut bytes, "value")?));
        }
        Ok(KeyState::from_entries(entries))
    }

    /// Applies `changes`, as a later input of the key will see them.
    pub fn apply(&mut self, changes: &StateChanges) {
        for (name, change) in changes {
            if let Some(old) = self.entries.remove(name) {
                self.bytes -= name.len() + old.len();
            }
            if let Some(value) = change {
                self.bytes += name.len() + value.len();
                self.entries.insert(name.clone(), value.clone());
            }
        }
    }
}

/// The next length-prefixed part of an encoded state, taken off `bytes`.
fn take_part(bytes: &mut &[u8], what: &str) -> Result<Vec<u8>, String> {
    let (length, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| format!("the state ends inside an entry's {what} length"))?;
    let length = u32::from_be_bytes(*length) as usize;
    if rest.len() < length {
        return Err(format!("the state ends inside an entry's {what}"));
    }
    let (part, rest) = rest.split_at(length);
    *bytes = rest;
    Ok(part.to_vec())
}

/// A write the limits refuse: the call ends, and its input is dead-lettered as `state-limit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StateLimitExceeded(pub String);

/// What one plugin call sees of its key's state: the entries as earlier inputs left them,
/// with its own changes on top. The changes reach the key only if the call's input is
/// transformed.
#[derive(Debug, Clone)]
pub struct StateView {
    /// The state key: the message tells the plugin which it is.
    key: String,
    base: Arc<KeyState>,
    changes: StateChanges,
    bytes: usize,
    limits: StateLimits,
}

impl StateView {
    pub fn new(key: String, base: Arc<KeyState>, limits: StateLimits) -> StateView {
        StateView {
            key,
            bytes: base.bytes,
            base,
            changes: StateChanges::new(),
            limits,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        match self.changes.get(name) {
            Some(change) => change.as_deref(),
            None => self.base.entries.get(name).map(Vec::as_slice),
        }
    }

    pub fn set(&mut self, name: &str, value: Vec<u8>) -> Result<(), StateLimitExceeded> {
        let entry = name.len() + value.len();
        if entry > self.limits.max_entry_bytes {
            return Err(StateLimitExceeded(format!(
                "state entry {:?} of {entry} bytes (name and value) is larger than state.max_entry_bytes = {}",
                crate::text::escaped(name, 64),
                self.limits.max_entry_bytes
            )));
        }
        let old = self.get(name).map_or(0, |old| name.len() + old.len());
        let bytes = self.bytes - old + entry;
        if bytes > self.limits.max_key_bytes {
            return Err(StateLimitExceeded(format!(
                "the state of this key would hold {bytes} bytes, more than state.max_key_bytes = {}",
                self.limits.max_key_bytes
            )));
        }
        self.bytes = bytes;
        self.changes.insert(name.to_owned(), Some(value));
        Ok(())
    }

    pub fn delete(&mut self, name: &str) {
        if let Some(old) = self.get(name) {
            self.bytes -= name.len() + old.len();
            self.changes.insert(name.to_owned(), None);
        }
    }

    /// The names of the entries that start with `prefix` and sort after `start_after`, in
    /// byte order, at most `limit` (and at most `MAX_LISTED`).
    pub fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Vec<String> {
        let limit = limit.min(MAX_LISTED);
        let after = |name: &&String| name.as_str() > start_after && name.starts_with(prefix);
        let mut base = self.base.entries.keys().filter(after).peekable();
        let mut changed = self
            .changes
            .iter()
            .filter(|(name, _)| after(name))
            .peekable();
        let mut names = Vec::new();
        // Both are sorted: merge them, a change overriding the base's entry of its name.
        while names.len() < limit {
            let from_base = match (base.peek(), changed.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(b), Some((c, _))) => b < c,
            };
            if from_base {
                names.push(base.next().expect("peeked").clone());
                continue;
            }
            let (name, change) = changed.next().expect("peeked");
            if base.peek() == Some(&name) {
                base.next();
            }
            if change.is_some() {
                names.push(name.clone());
            }
        }
        names
    }

    /// The call's changes, for its key if its input is transformed.
    pub fn into_changes(self) -> StateChanges {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(entries: &[(&str, &str)], limits: StateLimits) -> StateView {
        let base = KeyState::from_entries(
            entries
                .iter()
                .map(|&(name, value)| (name.to_owned(), value.as_bytes().to_vec())),
        );
        StateView::new("k".into(), Arc::new(base), limits)
    }

    #[test]
    fn a_view_reads_its_own_changes_over_the_base() {
        let mut state = view(&[("a", "1"), ("b", "2")], StateLimits::default());
        state.set("a", b"10".to_vec()).unwrap();
        state.delete("b");
        state.set("c", b"3".to_vec()).unwrap();
        assert_eq!(state.get("a"), Some(&b"10"[..]));
        assert_eq!(state.get("b"), None);
        assert_eq!(state.get("c"), Some(&b"3"[..]));
        let mut key =
            KeyState::from_entries([("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]);
        key.apply(&state.into_changes());
        assert_eq!(
            key,
            KeyState::from_entries([("a".into(), b"10".to_vec()), ("c".into(), b"3".to_vec())])
        );
        assert_eq!(key.bytes(), 1 + 2 + 1 + 1);
    }

    #[test]
    fn list_merges_changes_in_order_from_a_start_and_bounded() {
        let mut state = view(
            &[
                ("acct.1", ""),
                ("acct.3", ""),
                ("acct.5", ""),
                ("other", ""),
            ],
            StateLimits::default(),
        );
        state.set("acct.2", Vec::new()).unwrap();
        state.delete("acct.3");
        state.set("acct.5", b"new".to_vec()).unwrap();
        assert_eq!(state.list("acct.", "", 10), ["acct.1", "acct.2", "acct.5"]);
        assert_eq!(state.list("acct.", "acct.1", 10), ["acct.2", "acct.5"]);
        assert_eq!(state.list("acct.", "", 2), ["acct.1", "acct.2"]);
        assert_eq!(state.list("", "", 100).len(), 4);
        assert_eq!(state.list("zz", "", 10), Vec::<String>::new());
    }

    #[test]
    fn writes_past_the_limits_are_refused_and_change_nothing() {
        let limits = StateLimits {
            max_entry_bytes: 10,
            max_key_bytes: 20,
        };
        let mut state = view(&[("a", "12345678")], limits);
        let too_large = state.set("b", vec![0; 10]).unwrap_err();
        assert!(too_large.0.contains("state.max_entry_bytes"), "{too_large}");
        state.set("b", vec![0; 8]).unwrap();
        let too_much = state.set("c", vec![0; 5]).unwrap_err();
        assert!(too_much.0.contains("state.max_key_bytes"), "{too_much}");
        // Replacing an entry counts only the difference; deleting frees it.
        state.set("a", vec![0; 9]).unwrap();
        state.delete("b");
        state.set("c", vec![0; 9]).unwrap();
        assert_eq!(state.get("b"), None);
    }

    #[test]
    fn the_key_rule_reads_a_subject_token_or_a_header() {
        let input = |subject: &str, headers: &[(&str, &str)]| Input {
            subject: subject.into(),
            headers: headers
                .iter()
                .map(|&(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            payload: Default::default(),
            stream_sequence: 1,
            stream_created_unix_ns: 0,
            published_unix_ns: 0,
            unreadable_headers: None,
        };
        let token = StateKeyRule::parse("subject-token:3").unwrap();
        assert_eq!(token.key_of(&input("tx.eu.acct-7", &[])).unwrap(), "acct-7");
        assert!(
            token
                .key_of(&input("tx.eu", &[]))
                .unwrap_err()
                .contains("no token 3")
        );
        let header = StateKeyRule::parse("header:Account").unwrap();
        assert_eq!(
            header.key_of(&input("tx", &[("Account", "a-1")])).unwrap(),
            "a-1"
        );
        assert!(
            header
                .key_of(&input("tx", &[]))
                .unwrap_err()
                .contains("no header Account")
        );
        for wrong in [
            "subject-token:0",
            "subject-token:x",
            "header:",
            "header:a b",
            "account",
            "key:1",
        ] {
            assert!(StateKeyRule::parse(wrong).is_err(), "{wrong}");
        }
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    #[test]
    fn a_key_state_decodes_to_what_was_encoded() {
        let state = KeyState::from_entries([
            ("balance".to_owned(), b"120".to_vec()),
            ("empty".to_owned(), Vec::new()),
            ("bytes".to_owned(), vec![0, 255, 7]),
        ]);
        let encoded = state.encode();
        assert_eq!(encoded.len(), state.encoded_len());
        assert_eq!(KeyState::decode(&encoded).unwrap(), state);
        assert_eq!(KeyState::decode(&[]).unwrap(), KeyState::default());
        assert!(KeyState::decode(&encoded[..encoded.len() - 1]).is_err());
        assert!(KeyState::decode(&[0, 0, 0]).is_err());
    }

    proptest::proptest! {
        /// The size a change is checked at before it is applied is the size it gives.
        #[test]
        fn the_length_after_changes_is_the_length_of_the_changed_state(
            entries in proptest::collection::btree_map("[a-d]{1,2}", proptest::collection::vec(0u8..4, 0..6), 0..6),
            changes in proptest::collection::btree_map(
                "[a-d]{1,2}",
                proptest::option::of(proptest::collection::vec(0u8..4, 0..6)),
                0..6,
            ),
        ) {
            let mut state = KeyState::from_entries(entries);
            let predicted = state.encoded_len_after(&changes);
            state.apply(&changes);
            proptest::prop_assert_eq!(predicted, state.encoded_len());
            proptest::prop_assert_eq!(predicted, state.encode().len());
        }
    }
}
