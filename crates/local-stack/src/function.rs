//! A compiled function binary run the way Lambda runs one: under a [`RuntimeApi`] of its own on
//! a free port, with the variables Lambda sets for a custom runtime plus the function's own, and
//! nothing inherited from the caller's environment; what it prints is collected. The
//! integration tests and the cold-start benchmark start the function binaries through it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::runtime_api::{Event, Logged, Options, Outcome, RuntimeApi, Unanswered};

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The function's name, as `AWS_LAMBDA_FUNCTION_NAME` and in the Runtime API's ARN.
    pub name: &'a str,
    pub binary: &'a Path,
    pub api: Options,
    /// The function's own variables, set after Lambda's (so one of them can replace Lambda's).
    pub vars: &'a [(&'a str, &'a str)],
    /// Also print every line the function writes to stderr, as it comes (the tests' `TEST_LOG`).
    pub echo: bool,
}

/// Why a function did not do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("starting {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) instead of answering")]
    Exited { name: String, status: ExitStatus },
    #[error("{name}: {reason}")]
    Unanswered { name: String, reason: Unanswered },
    #[error("{name} still running after {within:?}")]
    StillRunning { name: String, within: Duration },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
}

/// A function binary running under its own [`RuntimeApi`]. Killed when dropped.
pub struct FunctionProcess {
    name: String,
    api: RuntimeApi,
    child: Child,
    started_at: Instant,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl FunctionProcess {
    /// Starts the Runtime API, then the binary pointed at it.
    pub async fn spawn(launch: Launch<'_>) -> Result<Self, FunctionError> {
        let name = launch.name;
        let api = RuntimeApi::start_with(name, launch.api).await;
        let mut cmd = Command::new(launch.binary);
        cmd.env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", api.host_port())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2026/11/15/[$LATEST]0123456789abcdef0123456789abcdef",
            )
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .envs(launch.vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started_at = Instant::now();
        let mut child = cmd.spawn().map_err(|source| FunctionError::Spawn {
            path: launch.binary.to_owned(),
            source,
        })?;
        let output = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take(), output.clone(), launch.echo),
            collect(child.stderr.take(), output.clone(), launch.echo),
        ];
        Ok(Self {
            name: name.to_owned(),
            api,
            child,
            started_at,
            output,
            readers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn api(&self) -> &RuntimeApi {
        &self.api
    }

    /// Just before the process was spawned: where a cold start's init begins.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// `None` once it has exited and been waited for.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// One invocation, as Lambda would make it; an error if the function exits or does not
    /// answer within `within` instead.
    pub async fn invoke(
        &mut self,
        event: Value,
        within: Duration,
    ) -> Result<Outcome, FunctionError> {
        let answer = self.api.try_invoke(event, within);
        tokio::select! {
            biased;
            outcome = answer => outcome.map_err(|reason| FunctionError::Unanswered {
                name: self.name.clone(),
                reason,
            }),
            status = self.child.wait() => Err(match status {
                Ok(status) => FunctionError::Exited { name: self.name.clone(), status },
                Err(source) => FunctionError::Wait { name: self.name.clone(), source },
            }),
        }
    }

    /// Waits for a function that should stop by itself.
    pub async fn exit_status(&mut self, within: Duration) -> Result<ExitStatus, FunctionError> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.map_err(|source| FunctionError::Wait {
                name: self.name.clone(),
                source,
            }),
            Err(_) => Err(FunctionError::StillRunning {
                name: self.name.clone(),
                within,
            }),
        }
    }

    /// Waits until the init is over: the runtime and every extension it registered wait for
    /// their first event, where Lambda's init ends. `false` if that did not happen `within`.
    pub async fn initialised(&self, within: Duration) -> bool {
        let over = |log: &[Logged]| {
            log.iter()
                .any(|l| l.event == Event::Settled { request_id: None })
        };
        self.api.wait_for(within, over).await
    }

    /// Waits until the last invocation handed out is over: the runtime and every extension have
    /// asked for their next event, so its after-work (a miss's fill, the metrics line) is done.
    /// `false` if that did not happen `within`; `true` at once if nothing was handed out.
    pub async fn settled(&self, within: Duration) -> bool {
        let last = self
            .api
            .events()
            .into_iter()
            .rev()
            .find_map(|l| match l.event {
                Event::Delivered { request_id } => Some(request_id),
                _ => None,
            });
        let Some(id) = last else { return true };
        let over = |log: &[Logged]| {
            log.iter()
                .any(|l| matches!(&l.event, Event::Settled { request_id: Some(r) } if *r == id))
        };
        self.api.wait_for(within, over).await
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's peak resident set size so far (`VmHWM`), in MiB; `None` once it is gone.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    pub async fn kill(&mut self) {
        // Already gone is as good.
        let _ = self.child.kill().await;
    }

    /// Everything the function printed so far; complete once it has exited.
    pub async fn output(&mut self) -> String {
        if !self.is_running() {
            for reader in self.readers.drain(..) {
                let _ = reader.await;
            }
        }
        self.output.lock().unwrap().clone()
    }
}

fn collect(
    pipe: Option<impl AsyncRead + Unpin + Send + 'static>,
    into: Arc<Mutex<String>>,
    echo: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(pipe) = pipe else { return };
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("[function] {line}");
            }
            let mut out = into.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
    })
}
