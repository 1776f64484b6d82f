//! RESP2 on the wire: parsing requests and whole replies, encoding what the front answers.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads whole RESP2 replies off a stream.
pub(super) struct ReplyReader<R> {
    stream: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    pub(super) fn new(stream: R) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    pub(super) async fn next_reply(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(len) = reply_len(&self.buf)? {
                return Ok(self.buf.drain(..len).collect());
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The line at the start of `buf` (without its CRLF) and the length with it.
pub(super) fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(text: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| invalid("a RESP length is not a number"))
}

/// The length of the complete RESP2 reply at the start of `buf`, `None` if more is needed.
pub(super) fn reply_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((head, head_len)) = line(buf) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(head_len)),
        b'$' => {
            let len = number(&head[1..])?;
            if len < 0 {
                return Ok(Some(head_len));
            }
            let total = head_len + len as usize + 2;
            Ok((buf.len() >= total).then_some(total))
        }
        b'*' => {
            let count = number(&head[1..])?;
            let mut at = head_len;
            for _ in 0..count.max(0) {
                match reply_len(&buf[at..])? {
                    Some(len) => at += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(invalid("the backend sent a reply that is not RESP2")),
    }
}

/// The request at the start of `buf`: its arguments and its length in bytes; `None` if more is
/// needed. A multibulk request, or an inline one (words on a line) as redis-cli sends.
pub(super) fn parse_request(buf: &[u8]) -> io::Result<Option<(Vec<Vec<u8>>, usize)>> {
    let Some((head, head_len)) = line(buf) else {
        if buf.len() > 64 * 1024 && buf[0] != b'*' {
            return Err(invalid("inline request too long"));
        }
        return Ok(None);
    };
    if buf[0] != b'*' {
        let args = head
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        return Ok(Some((args, head_len)));
    }
    let count = number(&head[1..])?;
    let mut args = Vec::with_capacity(count.clamp(0, 4_096) as usize);
    let mut at = head_len;
    for _ in 0..count.max(0) {
        let Some((head, len)) = line(&buf[at..]) else {
            return Ok(None);
        };
        if head.first() != Some(&b'$') {
            return Err(invalid("a request's argument is not a bulk string"));
        }
        let size = number(&head[1..])?;
        if size < 0 {
            return Err(invalid("a request's argument has a negative length"));
        }
        let start = at + len;
        let end = start + size as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

pub(super) fn encode_request(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(&bulk(arg));
    }
    out
}

pub(super) fn bulk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

pub(super) fn error(text: &str) -> Vec<u8> {
    format!("-{}\r\n", text.replace(['\r', '\n'], " ")).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_parse_whole_or_not_at_all() {
        let req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let (args, len) = parse_request(req).unwrap().unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(len, req.len());
        assert!(parse_request(&req[..req.len() - 1]).unwrap().is_none());
        let reply = b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n+OK\r\n";
        assert_eq!(reply_len(reply).unwrap(), Some(reply.len() - 5));
        assert_eq!(reply_len(&reply[..6]).unwrap(), None);
        assert_eq!(reply_len(b"$-1\r\n").unwrap(), Some(5));
    }
}
