//! A few fields of a JSON document, read as its bytes stream past: the document itself is
//! never held. An answer of any size is metered by its `usage` (which Azure writes after the
//! content it counts), where holding the body would bound what can be read.
//!
//! The scanner tracks only what locates a field: nesting, strings and escapes, and the keys
//! on the way down. It captures the raw text of the values at the wanted paths (each at
//! most [`MAX_VALUE_BYTES`]); everything else passes through without being kept. It does not
//! validate: a broken document yields whatever complete values it held.

/// A captured value longer than this is dropped (usage, ids and model names are far shorter).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Keys longer than this never match (the wanted keys are short).
const MAX_KEY_BYTES: usize = 32;

/// A path of object keys from the document's root, e.g. `["response", "usage"]`.
pub type Path = &'static [&'static str];

#[derive(Debug)]
pub struct JsonFields {
    wanted: &'static [Path],
    /// The open containers down to the deepest one that can still lead to a wanted path;
    /// deeper ones are only counted.
    frames: Vec<Frame>,
    deeper: u32,
    string: StringState,
    capture: Option<Capture>,
    found: Vec<(usize, Vec<u8>)>,
}

#[derive(Debug)]
struct Frame {
    object: bool,
    /// In an object: the next string is a key.
    expect_key: bool,
    /// In an object: the key whose value comes next (empty once it is too long to match).
    key: Vec<u8>,
    key_too_long: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum StringState {
    #[default]
    Outside,
    /// In a string; `key` when it is an object key, `escaped` right after a backslash.
    Inside { key: bool, escaped: bool },
}

#[derive(Debug)]
struct Capture {
    target: usize,
    bytes: Vec<u8>,
    /// Containers open when the value started (it ends when that many are open again).
    depth: usize,
    kind: ValueKind,
    too_long: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Container,
    String,
    /// A number or `true`/`false`/`null`: ends at the next structural byte or whitespace.
    Bare,
}

impl JsonFields {
    pub fn new(wanted: &'static [Path]) -> Self {
        Self {
            wanted,
            frames: Vec::new(),
            deeper: 0,
            string: StringState::Outside,
            capture: None,
            found: Vec::new(),
        }
    }

    /// The raw text of the first complete value found at `path`, if any.
    pub fn get(&self, path: Path) -> Option<&str> {
        let target = self.wanted.iter().position(|p| *p == path)?;
        self.found
            .iter()
            .find(|(t, _)| *t == target)
            .and_then(|(_, bytes)| std::str::from_utf8(bytes).ok())
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            // The bulk of an answer is text no one wants: skip to its end (or an escape).
            if self.string
                == (StringState::Inside {
                    key: false,
                    escaped: false,
                })
                && self.capture.is_none()
            {
                match memchr::memchr2(b'"', b'\\', &bytes[at..]) {
                    Some(skip) => at += skip,
                    None => return,
                }
            }
            self.byte(bytes[at]);
            at += 1;
        }
    }

    /// A document that ended right after a bare value (`{"a":1` cut, or a bare top level)
    /// completes it.
    pub fn finish(&mut self) {
        if self
            .capture
            .as_ref()
            .is_some_and(|c| c.kind == ValueKind::Bare)
        {
            self.end_capture();
        }
    }

    fn byte(&mut self, b: u8) {
        if let StringState::Inside { key, escaped } = self.string {
            self.string_byte(b, key, escaped);
            return;
        }
        if let Some(capture) = &self.capture
            && capture.kind == ValueKind::Bare
        {
            if matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace() {
                self.end_capture();
            } else {
                self.record(b);
                return;
            }
        }
        match b {
            b'"' => {
                let key = self.frames.last().is_some_and(|f| f.object && f.expect_key)
                    && self.deeper == 0;
                if key {
                    let frame = self.frames.last_mut().expect("checked");
                    frame.key.clear();
                    frame.key_too_long = false;
                } else {
                    self.value_starts(ValueKind::String);
                }
                self.record(b);
                self.string = StringState::Inside {
                    key,
                    escaped: false,
                };
            }
            b'{' | b'[' => {
                self.value_starts(ValueKind::Container);
                self.record(b);
                let object = b == b'{';
                if self.deeper == 0 && self.frames.len() < self.max_depth() {
                    self.frames.push(Frame {
                        object,
                        expect_key: object,
                        key: Vec::new(),
                        key_too_long: false,
                    });
                } else {
                    self.deeper += 1;
                }
            }
            b'}' | b']' => {
                self.record(b);
                if self.deeper > 0 {
                    self.deeper -= 1;
                } else {
                    self.frames.pop();
                }
                if self
                    .capture
                    .as_ref()
                    .is_some_and(|c| c.kind == ValueKind::Container && self.depth() == c.depth)
                {
                    self.end_capture();
                }
            }
            b':' => {
                self.record(b);
                if self.deeper == 0
                    && let Some(frame) = self.frames.last_mut().filter(|f| f.object)
                {
                    frame.expect_key = false;
                }
            }
            b',' => {
                self.record(b);
                if self.deeper == 0
                    && let Some(frame) = self.frames.last_mut().filter(|f| f.object)
                {
                    frame.expect_key = true;
                }
            }
            b if b.is_ascii_whitespace() => self.record(b),
            _ => {
                self.value_starts(ValueKind::Bare);
                self.record(b);
            }
        }
    }

    fn string_byte(&mut self, b: u8, key: bool, escaped: bool) {
        let closes = !escaped && b == b'"';
        // Inside a captured value its keys are part of it; a key on the way down is kept.
        self.record(b);
        if key
            && !closes
            && let Some(frame) = self.frames.last_mut()
        {
            if frame.key.len() < MAX_KEY_BYTES {
                frame.key.push(b);
            } else {
                frame.key_too_long = true;
            }
        }
        self.string = if closes {
            if !key
                && self
                    .capture
                    .as_ref()
                    .is_some_and(|c| c.kind == ValueKind::String && self.depth() == c.depth)
            {
                self.end_capture();
            }
            StringState::Outside
        } else {
            StringState::Inside {
                key,
                escaped: !escaped && b == b'\\',
            }
        };
    }

    /// Containers open now.
    fn depth(&self) -> usize {
        self.frames.len() + self.deeper as usize
    }

    /// Frames worth keeping: as deep as the longest wanted path.
    fn max_depth(&self) -> usize {
        self.wanted.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    /// A value starts here: capture it when the keys leading to it are a wanted path.
    fn value_starts(&mut self, kind: ValueKind) {
        if self.capture.is_some() || self.deeper > 0 {
            return;
        }
        // Only object members have paths (array elements are not wanted).
        if self
            .frames
            .iter()
            .any(|f| !f.object || f.key_too_long || f.key.is_empty())
            || self.frames.is_empty()
        {
            return;
        }
        let target = self.wanted.iter().position(|path| {
            path.len() == self.frames.len()
                && path
                    .iter()
                    .zip(&self.frames)
                    .all(|(want, frame)| want.as_bytes() == frame.key.as_slice())
        });
        let Some(target) = target else {
            return;
        };
        if self.found.iter().any(|(t, _)| *t == target) {
            return; // the first one counts
        }
        self.capture = Some(Capture {
            target,
            bytes: Vec::new(),
            depth: self.depth(),
            kind,
            too_long: false,
        });
    }

    fn record(&mut self, b: u8) {
        if let Some(capture) = &mut self.capture {
            if capture.bytes.len() < MAX_VALUE_BYTES {
                capture.bytes.push(b);
            } else {
                capture.too_long = true;
            }
        }
    }

    fn end_capture(&mut self) {
        if let Some(capture) = self.capture.take()
            && !capture.too_long
        {
            self.found.push((capture.target, capture.bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const WANTED: &[Path] = &[
        &["usage"],
        &["id"],
        &["n"],
        &["response", "usage"],
        &["response", "id"],
    ];

    fn scan(doc: &str, chunk: usize) -> JsonFields {
        let mut fields = JsonFields::new(WANTED);
        for piece in doc.as_bytes().chunks(chunk.max(1)) {
            fields.feed(piece);
        }
        fields.finish();
        fields
    }

    #[test]
    fn top_level_and_nested_fields_are_found_in_any_chunking() {
        let doc = r#"{"choices":[{"message":{"content":"a \"usage\": {\"x\":1} b","usage":{"fake":1}}}],
            "id" : "chatcmpl-1", "n": 12 ,"usage":{"prompt_tokens":3,"completion_tokens":4},
            "response":{"output":[{"id":"inner"}],"id":"resp_1","usage":{"input_tokens":5}}}"#;
        for chunk in [1, 2, 3, 7, 64, doc.len()] {
            let f = scan(doc, chunk);
            assert_eq!(
                f.get(&["usage"]),
                Some(r#"{"prompt_tokens":3,"completion_tokens":4}"#),
                "chunks of {chunk}"
            );
            assert_eq!(f.get(&["id"]), Some(r#""chatcmpl-1""#));
            assert_eq!(f.get(&["n"]), Some("12"));
            assert_eq!(f.get(&["response", "usage"]), Some(r#"{"input_tokens":5}"#));
            assert_eq!(f.get(&["response", "id"]), Some(r#""resp_1""#));
        }
    }

    #[test]
    fn a_huge_document_keeps_only_the_wanted_values() {
        let content = "x".repeat(3 << 20);
        let doc = format!(
            r#"{{"choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"total_tokens":9}}}}"#
        );
        let f = scan(&doc, 16 * 1024);
        assert_eq!(f.get(&["usage"]), Some(r#"{"total_tokens":9}"#));
        assert!(f.found.iter().map(|(_, v)| v.len()).sum::<usize>() < 64);
    }

    #[test]
    fn a_bare_value_at_the_end_and_too_long_values() {
        assert_eq!(scan(r#"{"n":42"#, 3).get(&["n"]), Some("42"));
        let long = format!(r#"{{"id":"{}","n":1}}"#, "i".repeat(MAX_VALUE_BYTES + 1));
        let f = scan(&long, 1024);
        assert_eq!(f.get(&["id"]), None);
        assert_eq!(f.get(&["n"]), Some("1"));
    }

    proptest! {
        /// Whatever the bytes, scanning never panics, and a value it reports for `usage` of
        /// a valid document is that document's `usage`.
        #[test]
        fn any_bytes_are_scanned_and_valid_documents_agree_with_serde(
            junk in proptest::collection::vec(any::<u8>(), 0..256),
            usage in proptest::option::of(0u32..1000),
            filler in "[a-z\"\\\\{}\\[\\],: ]{0,40}",
            chunk in 1usize..17,
        ) {
            let mut f = JsonFields::new(WANTED);
            f.feed(&junk);
            f.finish();
            let mut doc = serde_json::json!({ "text": filler, "list": [filler.clone(), {"usage": 1}] });
            if let Some(u) = usage {
                doc["usage"] = serde_json::json!({ "total_tokens": u });
            }
            let text = doc.to_string();
            let f = scan(&text, chunk);
            let expected = doc.get("usage").map(|u| u.to_string());
            prop_assert_eq!(f.get(&["usage"]).map(str::to_owned), expected);
        }
    }
}
