//! Server-sent events as the specification frames them: lines end in CRLF, LF or CR; an
//! empty line ends an event; `data:` lines join with LF; `event:`, `id:`, `retry:` and
//! comment (`:`) lines carry no data. Events are handed out as the raw bytes received, so a
//! relay can pass them on unchanged.
//!
//! Hand-written because the relay needs each event's exact bytes: the SSE crates
//! (`eventsource-stream`, `sse-stream`) yield parsed events and would re-encode what the
//! client is owed.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// Cuts a byte stream into whole events. Events are handed out as shared slices of what was
/// received (no copy, and no shifting of what is held when many events come in one chunk).
#[derive(Debug, Default)]
pub struct EventSplitter {
    buf: BytesMut,
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
    pub fn take_rest(&mut self) -> Bytes {
        self.line_start = 0;
        self.scanned = 0;
        self.buf.split().freeze()
    }

    /// The next whole event, terminating empty line included.
    pub fn next_event(&mut self) -> Option<Bytes> {
        while let Some(offset) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]) {
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
                let event = self.buf.split_to(self.scanned).freeze();
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
/// has none, e.g. a comment or a keep-alive). Borrowed when the event has one `data:` line,
/// as streamed answers' events do.
pub fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = event;
    while !rest.is_empty() {
        // Lines end in CR or LF alike: a CRLF leaves an empty line, skipped as blank.
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[(end + 1).min(rest.len())..];
        if line.is_empty() || line[0] == b':' {
            continue; // blank, or a comment
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &line[line.len()..]),
        };
        if field != b"data" {
            continue; // event, id, retry and unknown fields carry no data
        }
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match &mut data {
            Some(d) => {
                let d = d.to_mut();
                d.push(b'\n');
                d.extend_from_slice(value);
            }
            None => data = Some(Cow::Borrowed(value)),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8]) -> (Vec<Bytes>, Bytes) {
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
            assert_eq!(&rest[..], b":");
            assert_eq!(event_data(&got[1]).as_deref(), Some(&b"b"[..]));
        }
    }

    #[test]
    fn a_trailing_cr_waits_to_see_whether_an_lf_follows() {
        let mut s = EventSplitter::default();
        s.push(b"data: a\r\n\r");
        assert_eq!(s.next_event(), None, "the CR may start a CRLF");
        s.push(b"\n");
        assert_eq!(s.next_event().unwrap(), &b"data: a\r\n\r\n"[..]);
    }

    #[test]
    fn data_lines_join_and_other_fields_carry_none() {
        let event = b": keep-alive\r\nevent: message\r\nid: 7\r\ndata:{\"a\":\r\ndata: 1}\r\nretry: 10\r\n\r\n";
        assert_eq!(event_data(event).as_deref(), Some(&b"{\"a\":\n1}"[..]));
        assert_eq!(event_data(b": just a comment\n\n"), None);
    }
}
