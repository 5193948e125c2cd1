//! Container logs as kubectl shows them, from the CRI log format the runtimes write
//! (`TIME STREAM TAG MESSAGE`, tag `P` for a partial line continued by the next record).

/// What `kubectl logs` asked for.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// The last N lines.
    pub tail: Option<usize>,
    /// Prefix each line with its RFC 3339 time (`--timestamps`).
    pub timestamps: bool,
    /// Only lines at or after this Unix time (`--since`, `--since-time`).
    pub since_unix: Option<i64>,
    /// At most this many bytes (`--limit-bytes`).
    pub limit_bytes: Option<usize>,
}

/// The records of a CRI log: (stream, partial, message).
pub fn records(raw: &[u8]) -> Vec<(&str, bool, &[u8])> {
    let mut out = vec![];
    for rec in raw.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
        let mut parts = rec.splitn(4, |b| *b == b' ');
        let (Some(_ts), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let stream = if stream == b"stderr" { "stderr" } else { "stdout" };
        out.push((stream, tag == b"P", parts.next().unwrap_or_default()));
    }
    out
}

/// Renders CRI log records as kubectl's output.
pub fn render(raw: &[u8], o: &LogOptions) -> Vec<u8> {
    let mut lines: Vec<(String, Vec<u8>)> = vec![];
    let mut partial: Option<(String, Vec<u8>)> = None;
    for rec in raw.split(|b| *b == b'\n') {
        if rec.is_empty() {
            continue;
        }
        let mut parts = rec.splitn(4, |b| *b == b' ');
        let (Some(ts), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let msg = parts.next().unwrap_or_default();
        let ts = String::from_utf8_lossy(ts).into_owned();
        let (t0, mut acc) = partial.take().unwrap_or((ts, Vec::new()));
        acc.extend_from_slice(msg);
        if tag == b"P" {
            partial = Some((t0, acc));
        } else {
            lines.push((t0, acc));
        }
    }
    if let Some(p) = partial {
        lines.push(p);
    }
    if let Some(since) = o.since_unix {
        lines.retain(|(ts, _)| shoal_client::time::parse(ts).is_some_and(|t| t >= since));
    }
    let skip = o.tail.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = Vec::new();
    for (ts, msg) in &lines[skip..] {
        if o.timestamps {
            out.extend_from_slice(ts.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(msg);
        out.push(b'\n');
    }
    if let Some(l) = o.limit_bytes {
        out.truncate(l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_stream() {
        let raw = b"2026-11-25T10:00:00Z stdout F one\n2026-11-25T10:00:01Z stderr P tw\n";
        assert_eq!(records(raw), vec![("stdout", false, &b"one"[..]), ("stderr", true, &b"tw"[..])]);
    }

    #[test]
    fn cri_records_render_as_kubectl_shows_them() {
        let raw = b"2026-11-25T10:00:00.000000001Z stdout F one\n2026-11-25T10:00:01.5Z stderr P tw\n2026-11-25T10:00:01.6Z stderr F o\n2026-11-25T10:00:05Z stdout F three\n";
        assert_eq!(render(raw, &LogOptions::default()), b"one\ntwo\nthree\n");
        assert_eq!(render(raw, &LogOptions { tail: Some(2), ..Default::default() }), b"two\nthree\n");
        assert_eq!(render(raw, &LogOptions { tail: Some(0), ..Default::default() }), b"");
        assert_eq!(render(raw, &LogOptions { tail: Some(1), timestamps: true, ..Default::default() }), b"2026-11-25T10:00:05Z three\n");
        let since = shoal_client::time::parse("2026-11-25T10:00:01Z").unwrap();
        assert_eq!(render(raw, &LogOptions { since_unix: Some(since), ..Default::default() }), b"two\nthree\n");
        assert_eq!(render(raw, &LogOptions { limit_bytes: Some(5), ..Default::default() }), b"one\nt");
    }
}
