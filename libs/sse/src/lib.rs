//! Incremental Server-Sent Events parser (bytes in, frames out). Used for llama-server's
//! `/completion` stream and by clients of orchestratord's `/v2/tasks/{id}/events`.
//! Bytes are buffered until a frame is complete, so a UTF-8 sequence split across network
//! chunks is never mangled.

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseFrame {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// A frame grew past the parser's limit before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    pub max: usize,
}

impl std::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an SSE frame exceeded {} bytes", self.max)
    }
}

impl std::error::Error for FrameTooLarge {}

/// Scans each byte once (a frame end split across pushes is found by rescanning at most three
/// bytes) and moves the buffer once per push, so feeding a stream costs time linear in its size.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Bytes at the start of `buf` already searched for a frame end.
    scanned: usize,
    max_frame: Option<usize>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that refuses a frame longer than `max` bytes ([`SseParser::try_push`]): for
    /// streams from peers that are not trusted to end their frames.
    pub fn with_max_frame(max: usize) -> Self {
        Self {
            max_frame: Some(max),
            ..Self::default()
        }
    }

    /// Feeds bytes; returns the frames completed by them. Comment-only frames (keep-alives)
    /// are skipped. Without a frame limit this never fails.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        self.try_push(bytes).unwrap_or_default()
    }

    /// [`SseParser::push`], or `FrameTooLarge` once a frame (complete or not) is longer than
    /// the limit; the buffer is dropped then.
    pub fn try_push(&mut self, bytes: &[u8]) -> Result<Vec<SseFrame>, FrameTooLarge> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        let mut from = self.scanned.saturating_sub(3);
        while let Some((end, sep)) = find_frame_end(&self.buf, from.max(start)) {
            self.check(end - start)?;
            if let Some(f) = parse_frame(&self.buf[start..end]) {
                frames.push(f);
            }
            start = end + sep;
            from = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        self.check(self.buf.len())?;
        Ok(frames)
    }

    fn check(&mut self, len: usize) -> Result<(), FrameTooLarge> {
        match self.max_frame {
            Some(max) if len > max => {
                self.buf.clear();
                self.scanned = 0;
                Err(FrameTooLarge { max })
            }
            _ => Ok(()),
        }
    }

    /// Bytes of an incomplete frame still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The first frame end (`\n\n` or `\r\n\r\n`) at or after `from`: its index and length.
fn find_frame_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
        if rest.starts_with(b"\n\n") {
            return Some((i, 2));
        }
        i += 1;
    }
    None
}

fn parse_frame(raw: &[u8]) -> Option<SseFrame> {
    let text = String::from_utf8_lossy(raw);
    let mut frame = SseFrame::default();
    let mut has_data = false;
    let mut any = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        any = true;
        match field {
            "event" => frame.event = Some(value.to_string()),
            "id" => frame.id = Some(value.to_string()),
            "data" => {
                if has_data {
                    frame.data.push('\n');
                }
                frame.data.push_str(value);
                has_data = true;
            }
            _ => {}
        }
    }
    any.then_some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: ORCH-2315
    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let stream = "event: token\nid: 3\ndata: {\"t\":\"caf\u{e9}\"}\n\n: keep-alive\n\ndata: a\ndata: b\r\n\r\n";
        let bytes = stream.as_bytes();
        for split in 0..bytes.len() {
            let mut p = SseParser::new();
            let mut frames = p.push(&bytes[..split]);
            frames.extend(p.push(&bytes[split..]));
            assert_eq!(frames.len(), 2, "split at {split}");
            assert_eq!(frames[0].event.as_deref(), Some("token"));
            assert_eq!(frames[0].id.as_deref(), Some("3"));
            assert_eq!(frames[0].data, "{\"t\":\"caf\u{e9}\"}");
            assert_eq!(frames[1].data, "a\nb");
            assert_eq!(p.pending(), 0);
        }
    }

    // covers: ORCH-2315
    #[test]
    fn a_stream_fed_one_byte_at_a_time_gives_the_same_frames() {
        let stream = "data: one\r\n\r\n: ping\n\nevent: e\ndata: two\n\ndata: three\n\n";
        let mut p = SseParser::new();
        let frames: Vec<SseFrame> = stream
            .as_bytes()
            .iter()
            .flat_map(|b| p.push(std::slice::from_ref(b)))
            .collect();
        let data: Vec<&str> = frames.iter().map(|f| f.data.as_str()).collect();
        assert_eq!(data, ["one", "two", "three"]);
        assert_eq!(frames[1].event.as_deref(), Some("e"));
    }

    // covers: ORCH-2313
    #[test]
    fn a_frame_over_the_limit_is_refused_whether_it_ended_or_not() {
        let mut p = SseParser::with_max_frame(16);
        assert_eq!(p.try_push(b"data: short\n\n").unwrap().len(), 1);
        // Unterminated and growing past the limit.
        assert!(p.try_push(b"data: 0123456").unwrap().is_empty());
        assert_eq!(p.try_push(b"789abcdef"), Err(FrameTooLarge { max: 16 }));
        assert_eq!(p.pending(), 0);
        // Complete but too long, in one push.
        let mut p = SseParser::with_max_frame(16);
        assert!(p.try_push(b"data: 0123456789abcdef\n\n").is_err());
        // Without a limit, any size passes.
        let big = format!("data: {}\n\n", "x".repeat(100_000));
        assert_eq!(SseParser::new().push(big.as_bytes())[0].data.len(), 100_000);
    }
}
