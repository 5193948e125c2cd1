//! `pods/exec` as kubectl 1.30+ speaks it: a WebSocket (RFC 6455) carrying the
//! remote-command stream protocol `v5.channel.k8s.io` (or `v4`): each binary message starts
//! with its stream (0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 resize; v5's 255 closes
//! the stream named by the next byte). The command runs on the pod's agent, reached over
//! its session (a reverse request); this side only relays.
//!
//! SPDY (kubectl before 1.30) is not spoken: such a client gets `400 Upgrade request
//! required`.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Response};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::status::ApiError;

/// The stream protocols offered, best first.
const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Largest WebSocket message accepted from a client.
const MAX_MESSAGE: usize = 8 << 20;

/// What `kubectl exec` asked for (query parameters; `command` repeats).
#[derive(Debug, Default, PartialEq)]
pub struct ExecParams {
    pub command: Vec<String>,
    pub container: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecParams {
    /// Parses the query of `pods/exec` (a command is required) or `pods/attach` (`attach`).
    pub fn parse(query: Option<&str>, attach: bool) -> Result<ExecParams, ApiError> {
        let mut p = ExecParams::default();
        for pair in query.unwrap_or("").split('&').filter(|x| !x.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::rest::percent_decode(v);
            let flag = || matches!(v.as_str(), "true" | "1" | "");
            match k {
                "command" => p.command.push(v),
                "container" => p.container = v,
                "stdin" => p.stdin = flag(),
                "stdout" => p.stdout = flag(),
                "stderr" => p.stderr = flag(),
                "tty" => p.tty = flag(),
                _ => {}
            }
        }
        if p.command.is_empty() && !attach {
            return Err(ApiError::bad_request("you must specify at least 1 command"));
        }
        if !(p.stdin || p.stdout || p.stderr) {
            return Err(ApiError::bad_request("you must specify at least 1 of stdin, stdout, stderr"));
        }
        Ok(p)
    }
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// The subprotocol to speak, if the request is a WebSocket upgrade offering one of ours.
pub fn negotiate(req: &Request<Incoming>) -> Result<(&'static str, String), ApiError> {
    let h = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if !h(header::UPGRADE).contains("websocket") || key.is_empty() {
        return Err(ApiError::bad_request("Upgrade request required"));
    }
    let offered = h(header::SEC_WEBSOCKET_PROTOCOL);
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    let proto = PROTOCOLS.iter().find(|p| offered.contains(p)).ok_or_else(|| ApiError::bad_request(format!("unable to upgrade: none of the offered subprotocols {offered:?} is supported (want one of {PROTOCOLS:?})")))?;
    Ok((proto, accept_key(&key)))
}

/// The 101 answer.
pub fn switching(proto: &str, accept: &str) -> Response<crate::server::Body> {
    Response::builder()
        .status(101)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, proto)
        .body(http_body_util::BodyExt::boxed(http_body_util::Empty::<Bytes>::new()))
        .expect("static headers are valid")
}

/// One frame, server to client (never masked).
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// A message read from the client: (opcode, payload), fragments joined.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut msg = Vec::new();
    let mut first_op = None;
    loop {
        let mut h = [0u8; 2];
        r.read_exact(&mut h).await?;
        let fin = h[0] & 0x80 != 0;
        let op = h[0] & 0x0f;
        if h[1] & 0x80 == 0 {
            return Err(bad("client frames must be masked"));
        }
        let len = match h[1] & 0x7f {
            126 => u64::from(r.read_u16().await?),
            127 => r.read_u64().await?,
            n => u64::from(n),
        };
        if len as usize > MAX_MESSAGE || msg.len() + len as usize > MAX_MESSAGE {
            return Err(bad("message too large"));
        }
        let mut mask = [0u8; 4];
        r.read_exact(&mut mask).await?;
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        if op >= 0x8 {
            // Control frames may arrive between fragments; hand them up at once.
            return Ok((op, data));
        }
        if first_op.is_none() {
            first_op = Some(op);
        }
        msg.extend_from_slice(&data);
        if fin {
            return Ok((first_op.unwrap_or(op), msg));
        }
    }
}

/// The status written on stream 3 when the command ends, as the kubelet writes it.
pub fn exit_status(exit_code: i32, error: &str, command: &[String]) -> Value {
    if !error.is_empty() {
        return json!({"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError", "code": 500});
    }
    if exit_code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {exit_code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": exit_code.to_string()}]},
    })
}

/// Relays one exec between the client's WebSocket and the agent: client stdin goes to
/// `input`, agent replies come from `replies`.
pub async fn relay<IO, F, Fut>(io: IO, p: ExecParams, mut replies: mpsc::Receiver<shoal_proto::agent::ReverseReply>, input: F)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    F: Fn(shoal_proto::agent::StreamInput) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = wrx.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
            let _ = wr.flush().await;
        }
        let _ = wr.shutdown().await;
    });
    let input = Arc::new(input);
    let wtx2 = wtx.clone();
    let reader = tokio::spawn(async move {
        loop {
            let Ok((op, data)) = read_message(&mut rd).await else { return };
            match op {
                0x8 => return,
                0x9 => {
                    let _ = wtx2.send(frame(0xA, &data)).await;
                }
                0x1 | 0x2 => match data.first() {
                    Some(0) if data.len() > 1 => {
                        if !input(shoal_proto::agent::StreamInput { data: Bytes::copy_from_slice(&data[1..]), ..Default::default() }).await {
                            return;
                        }
                    }
                    // v5: the client closed its stdin.
                    Some(255) if data.get(1) == Some(&0) => {
                        let _ = input(shoal_proto::agent::StreamInput { close: true, ..Default::default() }).await;
                    }
                    // A terminal's new size: {"Width": 80, "Height": 24}.
                    Some(4) => {
                        let v: serde_json::Value = serde_json::from_slice(&data[1..]).unwrap_or_default();
                        let (w, h) = (v["Width"].as_u64().unwrap_or(0), v["Height"].as_u64().unwrap_or(0));
                        if w > 0 && h > 0 {
                            let _ = input(shoal_proto::agent::StreamInput { width: w.min(10_000) as u32, height: h.min(10_000) as u32, ..Default::default() }).await;
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    });
    let command = p.command.clone();
    loop {
        tokio::select! {
            r = replies.recv() => {
                let Some(r) = r else {
                    let st = exit_status(0, "the node's agent went away", &command);
                    let mut m = vec![3u8];
                    m.extend_from_slice(st.to_string().as_bytes());
                    let _ = wtx.send(frame(0x2, &m)).await;
                    break;
                };
                let want = match r.stream {
                    1 => p.stdout,
                    2 => p.stderr,
                    _ => false,
                };
                if want && !r.data.is_empty() {
                    let mut m = Vec::with_capacity(r.data.len() + 1);
                    m.push(r.stream as u8);
                    m.extend_from_slice(&r.data);
                    if wtx.send(frame(0x2, &m)).await.is_err() {
                        break;
                    }
                }
                if r.done || !r.error.is_empty() {
                    let st = exit_status(r.exit_code, &r.error, &command);
                    let mut m = vec![3u8];
                    m.extend_from_slice(st.to_string().as_bytes());
                    let _ = wtx.send(frame(0x2, &m)).await;
                    break;
                }
            }
            _ = async { while !reader.is_finished() { tokio::time::sleep(std::time::Duration::from_millis(50)).await } } => {
                // The client went away: dropping `replies` cancels the command.
                break;
            }
        }
    }
    let _ = wtx.send(frame(0x8, &1000u16.to_be_bytes())).await;
    drop(wtx);
    drop(replies);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn params_parse_repeated_commands() {
        assert!(ExecParams::parse(Some("command=sh&stdin=true&stdout=true&tty=true"), false).unwrap().tty);
        let p = ExecParams::parse(Some("command=sh&command=-c&command=echo%20hi&container=main&stdout=true&stderr=true"), false).unwrap();
        assert_eq!(p.command, vec!["sh", "-c", "echo hi"]);
        assert_eq!((p.container.as_str(), p.stdin, p.stdout, p.stderr, p.tty), ("main", false, true, true, false));
        assert_eq!(ExecParams::parse(Some("stdout=true"), false).unwrap_err().message, "you must specify at least 1 command");
        assert!(ExecParams::parse(Some("command=ls"), false).is_err(), "no stream");
        assert!(ExecParams::parse(Some("stdout=true&stderr=true"), true).is_ok(), "attach needs no command");
    }

    #[tokio::test]
    async fn frames_round_trip_with_masks_and_fragments() {
        // A masked client message in two fragments, with a ping in between.
        let mask = [1u8, 2, 3, 4];
        let masked = |op: u8, fin: bool, data: &[u8]| {
            let mut f = vec![if fin { 0x80 } else { 0 } | op, 0x80 | data.len() as u8];
            f.extend_from_slice(&mask);
            f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            f
        };
        let mut wire = masked(0x2, false, b"\x00he");
        wire.extend(masked(0x0, true, b"llo"));
        let mut r = &wire[..];
        assert_eq!(read_message(&mut r).await.unwrap(), (0x2, b"\x00hello".to_vec()));
        let unmasked = frame(0x2, b"x");
        assert!(read_message(&mut &unmasked[..]).await.is_err(), "unmasked client frames are refused");
        assert_eq!(frame(0x2, &[0u8; 300])[1], 126);
        assert_eq!(frame(0x2, &vec![0u8; 70_000])[1], 127);
    }

    #[test]
    fn exit_statuses_are_what_kubectl_reads() {
        let s = exit_status(3, "", &["sh".into()]);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status(0, "", &[])["status"], "Success");
        assert_eq!(exit_status(0, "container not running", &[])["message"], "container not running");
    }
}
