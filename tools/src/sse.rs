//! A reader of Server-Sent Events, for clients of the subscription
//! endpoints: the load tool, the balances example and the tests. It follows
//! the WHATWG event-stream format: `field: value` lines, an empty line ends
//! an event, lines starting with `:` are comments (heartbeats).

/// One event of an event stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field (a position or a stream version here).
    pub id: Option<String>,
    /// The `event:` field; `None` means the default type, `message`.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Turns bytes, as they arrive in chunks of any size, into events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The last byte ended a line with CR: a LF right after it belongs to
    /// the same line end.
    after_cr: bool,
    current: SseEvent,
    has_data: bool,
    /// Comment lines seen (heartbeats), for clients that watch them.
    pub comments: u64,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        // A line ends with CRLF, LF or CR alone (as the format says).
        for &b in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    let line = std::mem::take(&mut self.line);
                    self.take_line(&line, &mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.current));
            } else {
                self.current = SseEvent::default();
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_are_put_together() {
        let text = b": heartbeat\n\nid: 7\ndata: {\"a\":1}\n\nid: 8\r\ndata: x\rdata: y\r\n\r";
        for split in 0..text.len() {
            let mut p = SseParser::default();
            let mut got = p.push(&text[..split]);
            got.extend(p.push(&text[split..]));
            assert_eq!(
                got,
                vec![
                    SseEvent {
                        id: Some("7".into()),
                        event: None,
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        id: Some("8".into()),
                        event: None,
                        data: "x\ny".into()
                    },
                ],
                "split at {split}"
            );
            assert_eq!(p.comments, 1);
        }
    }
}

/// Property tests: any bytes, cut anywhere, give the same events, and events
/// written in the format come back as written.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Bytes that look like an event stream often enough to exercise every
    /// branch: field names, colons, both line ends, comments, and noise.
    fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"data: ".to_vec()),
            Just(b"data:".to_vec()),
            Just(b"data".to_vec()),
            Just(b"id: ".to_vec()),
            Just(b"event:".to_vec()),
            Just(b": ping".to_vec()),
            Just(b":".to_vec()),
            Just(b" ".to_vec()),
            Just("é€".as_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 1..8),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
    }

    /// Cut points, as fractions of the input's length.
    fn cuts() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(any::<usize>(), 0..12)
    }

    fn push_whole(bytes: &[u8]) -> (Vec<SseEvent>, u64) {
        let mut p = SseParser::default();
        let events = p.push(bytes);
        (events, p.comments)
    }

    fn push_cut(bytes: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, u64) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let mut p = SseParser::default();
        let mut events = Vec::new();
        for w in at.windows(2) {
            events.extend(p.push(&bytes[w[0]..w[1]]));
        }
        (events, p.comments)
    }

    /// A value that fits on one line.
    fn line_value() -> impl Strategy<Value = String> {
        "[^\r\n]{0,20}"
    }

    fn events() -> impl Strategy<Value = Vec<SseEvent>> {
        let event = (
            prop::option::of(line_value()),
            prop::option::of(line_value()),
            prop::collection::vec(line_value(), 1..4),
        )
            .prop_map(|(id, event, lines)| SseEvent {
                id,
                event,
                data: lines.join("\n"),
            });
        prop::collection::vec(event, 0..6)
    }

    /// The format as a server writes it, with one of the three line ends.
    fn encode(events: &[SseEvent], line_end: u8) -> Vec<u8> {
        let nl = ["\n", "\r\n", "\r"][usize::from(line_end % 3)];
        let mut out = format!(": hello{nl}{nl}");
        for e in events {
            if let Some(id) = &e.id {
                out.push_str(&format!("id: {id}{nl}"));
            }
            if let Some(ev) = &e.event {
                out.push_str(&format!("event: {ev}{nl}"));
            }
            for line in e.data.split('\n') {
                out.push_str(&format!("data: {line}{nl}"));
            }
            out.push_str(nl);
        }
        out.into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn the_cuts_do_not_change_the_events(bytes in stream_bytes(), cuts in cuts()) {
            prop_assert_eq!(push_cut(&bytes, &cuts), push_whole(&bytes));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), cuts in cuts()) {
            prop_assert_eq!(push_cut(&bytes, &cuts), push_whole(&bytes));
        }

        #[test]
        fn written_events_are_read_back(events in events(), line_end in any::<u8>(), cuts in cuts()) {
            let bytes = encode(&events, line_end);
            prop_assert_eq!(push_cut(&bytes, &cuts), (events, 1));
        }
    }
}
