//! The connection loop: accepting TLS clients, reading their requests, sending each where
//! [`route`](Connection::route) says, and writing the replies back in request order.

use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::info::trim_info;
use super::resp::{parse_request, ReplyReader};
use super::{Auth, Endpoint, Outcome, Shared, PROBE_TIMEOUT};
pub(super) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    ep: Endpoint,
) {
    let mut connections = JoinSet::new();
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "serverless front: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        connections.spawn(async move {
            let _ = client.set_nodelay(true);
            let tls = match tokio::time::timeout(PROBE_TIMEOUT * 5, acceptor.accept(client)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "serverless front: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            shared.connected(ep);
            if let Err(e) = Connection::run(tls, &shared, ep).await {
                tracing::debug!(error = %e, "serverless front: connection ended");
            }
        });
    }
}

/// Where a backend reply goes once read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    Primary = 0,
    Replica = 1,
}

/// One reply owed to the client, in request order.
enum Pending {
    /// Made by the front.
    Reply(Vec<u8>),
    /// The next reply of that backend; `info`: trim it as `INFO`.
    Backend { backend: Backend, info: bool },
    /// `QUIT`: flush and close.
    Close,
}

/// What the front does with one request.
pub(super) enum Action {
    Forward { backend: Backend, request: Vec<u8> },
    ForwardAsIs { backend: Backend, info: bool },
    Reply(Outcome, Vec<u8>),
    Close,
}

pub(super) struct Connection<'a> {
    pub(super) shared: &'a Shared,
    pub(super) endpoint: Endpoint,
    pub(super) authenticated: bool,
    pub(super) readonly: bool,
}

impl<'a> Connection<'a> {
    async fn run<S>(tls: S, shared: &'a Shared, endpoint: Endpoint) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut conn = Connection {
            shared,
            endpoint,
            authenticated: shared.auth == Auth::None,
            readonly: false,
        };
        // Backends: the primary always; the replica for the reader endpoint.
        let primary = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.primary_backend)).await?;
        primary.set_nodelay(true)?;
        let (primary_read, primary_write) = primary.into_split();
        let mut writers: [Option<BufWriter<OwnedWriteHalf>>; 2] =
            [Some(BufWriter::new(primary_write)), None];
        let mut readers: [Option<ReplyReader<OwnedReadHalf>>; 2] =
            [Some(ReplyReader::new(primary_read)), None];
        if endpoint == Endpoint::Reader {
            let replica = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.replica_backend)).await?;
            replica.set_nodelay(true)?;
            let (read, write) = replica.into_split();
            writers[1] = Some(BufWriter::new(write));
            readers[1] = Some(ReplyReader::new(read));
        }
        let (client_read, client_write) = tokio::io::split(tls);
        let (tx, rx) = mpsc::unbounded_channel();
        let reading = conn.read_requests(client_read, &mut writers, tx);
        let writing = write_replies(client_write, &mut readers, rx, shared);
        tokio::try_join!(reading, writing).map(|_| ())
    }

    /// Reads the client's requests, forwards or answers each, and queues where its reply
    /// comes from. Forwarded requests are flushed to the backends once every complete request
    /// read so far has been handled, so a pipeline stays one.
    async fn read_requests<R: AsyncRead + Unpin>(
        &mut self,
        mut client: R,
        writers: &mut [Option<BufWriter<OwnedWriteHalf>>; 2],
        tx: mpsc::UnboundedSender<Pending>,
    ) -> io::Result<()> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut consumed = 0;
            while let Some((args, used)) = parse_request(&buf[consumed..])? {
                let raw = &buf[consumed..consumed + used];
                consumed += used;
                if args.is_empty() {
                    continue;
                }
                let action = self.decide(&args);
                let pending = match action {
                    Action::Forward { backend, request } => {
                        let writer = writers[backend as usize]
                            .as_mut()
                            .expect("the endpoint has that backend");
                        writer.write_all(&request).await?;
                        Pending::Backend {
                            backend,
                            info: false,
                        }
                    }
                    Action::ForwardAsIs { backend, info } => {
                        let writer = writers[backend as usize]
                            .as_mut()
                            .expect("the endpoint has that backend");
                        writer.write_all(raw).await?;
                        Pending::Backend { backend, info }
                    }
                    Action::Reply(_, reply) => Pending::Reply(reply),
                    Action::Close => Pending::Close,
                };
                let close = matches!(pending, Pending::Close);
                if tx.send(pending).is_err() {
                    return Ok(());
                }
                if close {
                    for writer in writers.iter_mut().flatten() {
                        writer.flush().await?;
                    }
                    return Ok(());
                }
            }
            buf.drain(..consumed);
            for writer in writers.iter_mut().flatten() {
                writer.flush().await?;
            }
        }
    }

    /// What to do with one request (`args[0]` its command), counting it.
    fn decide(&mut self, args: &[Vec<u8>]) -> Action {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let action = self.route(&name, args);
        let outcome = match &action {
            Action::Forward { .. } | Action::ForwardAsIs { .. } => Outcome::Forwarded,
            Action::Reply(outcome, _) => *outcome,
            Action::Close => Outcome::Answered,
        };
        self.shared.count(self.endpoint, outcome, &name);
        action
    }
}

/// Sends the queued replies to the client in request order, reading each backend's next reply
/// when its turn comes. Flushes whenever nothing more is queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    client: W,
    readers: &mut [Option<ReplyReader<OwnedReadHalf>>; 2],
    mut rx: mpsc::UnboundedReceiver<Pending>,
    shared: &Shared,
) -> io::Result<()> {
    let mut out = BufWriter::new(client);
    loop {
        let pending = match rx.try_recv() {
            Ok(pending) => pending,
            Err(mpsc::error::TryRecvError::Empty) => {
                out.flush().await?;
                match rx.recv().await {
                    Some(pending) => pending,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        match pending {
            Pending::Reply(reply) => out.write_all(&reply).await?,
            Pending::Backend { backend, info } => {
                let reader = readers[backend as usize]
                    .as_mut()
                    .expect("the endpoint has that backend");
                let reply = reader.next_reply().await?;
                if info {
                    let keep = shared.evicted_keys.load(Ordering::SeqCst);
                    out.write_all(&trim_info(&reply, keep)).await?;
                } else {
                    out.write_all(&reply).await?;
                }
            }
            Pending::Close => {
                out.write_all(b"+OK\r\n").await?;
                out.flush().await?;
                let _ = out.shutdown().await;
                return Ok(());
            }
        }
    }
    out.flush().await?;
    let _ = out.shutdown().await;
    Ok(())
}
