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
    current: SseEvent,
    has_data: bool,
    /// Comment lines seen (heartbeats), for clients that watch them.
    pub comments: u64,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            self.take_line(&line, &mut out);
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
        let text = b": heartbeat\n\nid: 7\ndata: {\"a\":1}\n\nid: 8\r\ndata: x\r\ndata: y\r\n\r\n";
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
