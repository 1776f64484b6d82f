//! `moto_server` children: DynamoDB and DynamoDB Streams on a free port.

use std::path::Path;

use tokio::process::Child;

use super::*;

/// A `moto_server` child process serving DynamoDB and DynamoDB Streams on a
/// free loopback port. Every instance has its own in-memory state.
///
/// Lifetime rules are the same as for [`RedisServer`]: killed on drop and when
/// the *spawning thread* exits, so share one across tests only if it was
/// started from a long-lived thread.
#[derive(Debug)]
pub struct MotoServer {
    child: Option<Child>,
    port: u16,
    // Holds the log file and moto's working directory; deleted on drop.
    _dir: TempDir,
}

impl MotoServer {
    /// Spawns moto_server on a free port and waits until it answers HTTP.
    pub async fn start() -> Result<MotoServer, ServiceError> {
        Self::start_binary(&find_moto_server()?).await
    }

    /// Like [`start`](Self::start), with another executable taking moto_server's arguments
    /// (a wrapper that tunes its Python, say).
    pub async fn start_binary(binary: &Path) -> Result<MotoServer, ServiceError> {
        let dir = tempfile::Builder::new().prefix("local-moto-").tempdir()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match launch_moto(binary, dir.path(), port).await {
                Ok(child) => {
                    return Ok(MotoServer {
                        child: Some(child),
                        port,
                        _dir: dir,
                    })
                }
                Err(e @ ServiceError::Exited { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("PORT_ATTEMPTS is non-zero"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for the AWS SDK's `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits for it to exit. Calling it again is a no-op.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

async fn launch_moto(binary: &Path, dir: &Path, port: u16) -> Result<Child, ServiceError> {
    let spec = Launch {
        what: "moto_server",
        binary,
        args: vec![
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
        ],
        // Python block-buffers a redirected stderr/stdout; unbuffered output
        // makes the log tail in errors show what actually happened.
        env: &[("PYTHONUNBUFFERED", "1")],
        dir,
        port,
        probe: Probe::Http,
        ready_within: MOTO_READY_WITHIN,
    };
    spec.run().await
}
