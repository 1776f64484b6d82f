//! The state file: where a running stack is, written by `pcache dev` so that the commands acting
//! on it (`set-price`, `warm`) find it without being told.

use std::io;
use std::path::{Path, PathBuf};

use super::Stack;

/// Where a running stack is, for the commands that act on it (`set-price`, `warm`). Written by
/// the run command to `<state dir>/state.json` and removed when it stops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackState {
    pub pid: u32,
    pub http: String,
    pub redis_url: String,
    pub dynamodb_endpoint: String,
    pub table: String,
    pub key_attribute: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no running stack found: {path} does not exist (start one with scripts/run.sh, or pass --endpoint)")]
    Missing { path: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a state file")]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the stack that wrote {path} (pid {pid}) is no longer running (start one with scripts/run.sh, or pass --endpoint)")]
    Stale { path: PathBuf, pid: u32 },
}

impl StackState {
    pub const FILE: &'static str = "state.json";

    pub fn of(stack: &Stack) -> Self {
        Self {
            pid: std::process::id(),
            http: stack.http_url(),
            redis_url: stack.redis_url.clone(),
            dynamodb_endpoint: stack.dynamodb_endpoint.clone(),
            table: stack.table.clone(),
            key_attribute: stack.key_attribute.clone(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(Self::FILE)
    }

    /// Writes the file whole or not at all (a reader never sees half of it).
    pub fn write(&self, dir: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{}.{}", Self::FILE, self.pid));
        let json = serde_json::to_string_pretty(self).expect("plain data serialises");
        std::fs::write(&tmp, json + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The state of the stack running from `dir`; an error if there is none or it has exited.
    pub fn read(dir: &Path) -> Result<Self, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing { path })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: Self = serde_json::from_str(&text).map_err(|source| StateError::Invalid {
            path: path.clone(),
            source,
        })?;
        if !process_exists(state.pid) {
            return Err(StateError::Stale {
                path,
                pid: state.pid,
            });
        }
        Ok(state)
    }

    /// Removes the file if this process wrote it: another stack may have started from the same
    /// directory since, and its file must stay.
    pub fn remove_if_ours(dir: &Path) {
        let path = Self::path(dir);
        let ours = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Self>(&t).ok())
            .is_some_and(|s| s.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    // EPERM: it exists, but belongs to someone else.
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_know_a_dead_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StackState {
            pid: std::process::id(),
            http: "http://127.0.0.1:3000".into(),
            redis_url: "redis://127.0.0.1:1".into(),
            dynamodb_endpoint: "http://127.0.0.1:2".into(),
            table: "Products".into(),
            key_attribute: "productId".into(),
        };
        assert!(matches!(
            StackState::read(dir.path()),
            Err(StateError::Missing { .. })
        ));
        state.write(dir.path()).unwrap();
        assert_eq!(StackState::read(dir.path()).unwrap(), state);

        // A pid that cannot exist (above the kernel's pid_max limit).
        state.pid = 1 << 23;
        state.write(dir.path()).unwrap();
        assert!(matches!(
            StackState::read(dir.path()),
            Err(StateError::Stale { .. })
        ));
        StackState::remove_if_ours(dir.path());
        assert!(StackState::path(dir.path()).exists(), "not ours to remove");
        state.pid = std::process::id();
        state.write(dir.path()).unwrap();
        StackState::remove_if_ours(dir.path());
        assert!(!StackState::path(dir.path()).exists());
    }
}
