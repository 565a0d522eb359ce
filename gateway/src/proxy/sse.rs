//! Server-sent events as the specification frames them: lines end in CRLF, LF or CR; an
//! empty line ends an event; `data:` lines join with LF; `event:`, `id:`, `retry:` and
//! comment (`:`) lines carry no data. Events are handed out as the raw bytes received, so a
//! relay can pass them on unchanged.
//!
//! Hand-written because the relay needs each event's exact bytes: the SSE crates
//! (`eventsource-stream`, `sse-stream`) yield parsed events and would re-encode what the
//! client is owed.

/// Cuts a byte stream into whole events.
#[derive(Debug, Default)]
pub struct EventSplitter {
    buf: Vec<u8>,
    /// Where the current line starts, and how far the buffer has been scanned.
    line_start: usize,
    scanned: usize,
}

impl EventSplitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not make a whole event yet.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Take the held bytes (the stream ended, or holding is given up).
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.line_start = 0;
        self.scanned = 0;
        std::mem::take(&mut self.buf)
    }

    /// The next whole event, terminating empty line included.
    pub fn next_event(&mut self) -> Option<Vec<u8>> {
        while let Some(offset) = self.buf[self.scanned..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let at = self.scanned + offset;
            let len = match self.buf[at] {
                b'\n' => 1,
                // A CR last in the buffer may be the first half of a CRLF: wait for more.
                _ if at + 1 == self.buf.len() => return None,
                _ if self.buf[at + 1] == b'\n' => 2,
                _ => 1,
            };
            let empty_line = at == self.line_start;
            self.scanned = at + len;
            self.line_start = self.scanned;
            if empty_line {
                let event: Vec<u8> = self.buf.drain(..self.scanned).collect();
                self.scanned = 0;
                self.line_start = 0;
                return Some(event);
            }
        }
        self.scanned = self.buf.len();
        None
    }
}

/// The `data` of one event's raw bytes: its `data:` lines joined with LF (`None` when it
/// has none, e.g. a comment or a keep-alive).
pub fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    // Split on CR and LF alike: a CRLF yields an extra empty piece, skipped as blank.
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue; // blank, or a comment
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field != "data" {
            continue; // event, id, retry and unknown fields carry no data
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => data = Some(value.to_owned()),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut s = EventSplitter::default();
        s.push(input);
        let mut out = Vec::new();
        while let Some(e) = s.next_event() {
            out.push(e);
        }
        (out, s.take_rest())
    }

    #[test]
    fn every_line_ending_ends_events() {
        for sep in ["\n", "\r\n", "\r"] {
            // The next event's first byte follows, so a last CR cannot be half a CRLF.
            let stream = format!("data: a{sep}{sep}data: b{sep}{sep}:");
            let (got, rest) = events(stream.as_bytes());
            assert_eq!(got.len(), 2, "{sep:?}");
            assert_eq!(rest, b":");
            assert_eq!(event_data(&got[1]).as_deref(), Some("b"));
        }
    }

    #[test]
    fn a_trailing_cr_waits_to_see_whether_an_lf_follows() {
        let mut s = EventSplitter::default();
        s.push(b"data: a\r\n\r");
        assert_eq!(s.next_event(), None, "the CR may start a CRLF");
        s.push(b"\n");
        assert_eq!(s.next_event().unwrap(), b"data: a\r\n\r\n");
    }

    #[test]
    fn data_lines_join_and_other_fields_carry_none() {
        let event = b": keep-alive\r\nevent: message\r\nid: 7\r\ndata:{\"a\":\r\ndata: 1}\r\nretry: 10\r\n\r\n";
        assert_eq!(event_data(event).as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(event_data(b": just a comment\n\n"), None);
    }
}
