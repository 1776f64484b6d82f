//! The command policy: which requests the front refuses (unavailable commands, too many
//! arguments, keyless scripts, `CROSSSLOT`, `NOAUTH`), answers itself, forwards, or redirects
//! from the reader endpoint (`MOVED`), and where a command's keys are.

use product_cache::cache::slots::slot_of;

use super::connection::{Action, Backend, Connection};
use super::resp::error;
use super::{Endpoint, Outcome};

/// The most arguments one request may carry, the command's name included (AWS: "clients
/// cannot issue a request with more than 3,999 arguments").
pub const MAX_ARGUMENTS: usize = 3_999;

/// Commands a serverless cache does not offer: refused as unknown commands.
pub const REFUSED: &[&str] = &[
    "ACL",
    "BGREWRITEAOF",
    "BGSAVE",
    "CONFIG",
    "DEBUG",
    "FAILOVER",
    "FCALL",
    "FCALL_RO",
    "FUNCTION",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "MEMORY",
    "MIGRATE",
    "MODULE",
    "MONITOR",
    "MOVE",
    "PSYNC",
    "REPLCONF",
    "REPLICAOF",
    "SAVE",
    "SHUTDOWN",
    "SLAVEOF",
    "SLOWLOG",
    "SWAPDB",
    "SYNC",
    "WAIT",
    "WAITAOF",
];

/// Pub/sub: served by real serverless, not by this stand-in (its reply queue is one reply per
/// request).
const NOT_EMULATED: &[&str] = &[
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
];

impl Connection<'_> {
    fn forward_as_is(&self, backend: Backend) -> Action {
        Action::ForwardAsIs {
            backend,
            info: false,
        }
    }

    pub(super) fn route(&mut self, name: &str, args: &[Vec<u8>]) -> Action {
        let refuse = |text: String| Action::Reply(Outcome::Refused, error(&text));
        if args.len() > MAX_ARGUMENTS {
            return refuse(format!(
                "ERR too many arguments in request ({}); a serverless cache accepts at most \
                 {MAX_ARGUMENTS}",
                args.len()
            ));
        }
        let sub = || {
            args.get(1)
                .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase())
                .unwrap_or_default()
        };
        match name {
            "AUTH" => return self.auth(args),
            "HELLO" => return self.hello(args),
            "QUIT" => return Action::Close,
            "PING" if !self.authenticated => {
                return Action::Reply(Outcome::Answered, b"+PONG\r\n".to_vec())
            }
            _ if !self.authenticated => {
                return refuse("NOAUTH Authentication required.".into());
            }
            _ => {}
        }
        if REFUSED.contains(&name) {
            return refuse(unknown_command(args));
        }
        if NOT_EMULATED.contains(&name) {
            return refuse(format!(
                "ERR {name} is not emulated by the local serverless stand-in"
            ));
        }
        let here = match self.endpoint {
            Endpoint::Primary => Backend::Primary,
            Endpoint::Reader => Backend::Replica,
        };
        match name {
            "READONLY" => {
                self.readonly = true;
                return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec());
            }
            "READWRITE" => {
                self.readonly = false;
                return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec());
            }
            "ASKING" => return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec()),
            "SELECT" => {
                return if args.get(1).map(Vec::as_slice) == Some(b"0") {
                    Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec())
                } else {
                    refuse("ERR SELECT is not allowed in cluster mode".into())
                };
            }
            "CLUSTER" => return self.cluster(args),
            "SCRIPT" => {
                return match sub().as_str() {
                    "LOAD" | "EXISTS" => self.forward_as_is(Backend::Primary),
                    _ => refuse(unknown_subcommand(args, "SCRIPT")),
                }
            }
            "CLIENT" => {
                return match sub().as_str() {
                    "SETNAME" | "GETNAME" | "SETINFO" | "ID" | "INFO" | "NO-EVICT" | "NO-TOUCH" => {
                        self.forward_as_is(here)
                    }
                    _ => refuse(unknown_subcommand(args, "CLIENT")),
                }
            }
            "INFO" => {
                return Action::ForwardAsIs {
                    backend: here,
                    info: true,
                }
            }
            _ => {}
        }
        let (spec, read) = key_spec(name);
        let keys = match keys_of(spec, args) {
            Ok(keys) => keys,
            Err(text) => return refuse(text),
        };
        let slot = match keys.first() {
            None => None,
            Some(first) => {
                let slot = key_slot(first);
                if keys.iter().any(|k| key_slot(k) != slot) {
                    return refuse("CROSSSLOT Keys in request don't hash to the same slot".into());
                }
                Some(slot)
            }
        };
        match (self.endpoint, slot) {
            (Endpoint::Primary, _) => self.forward_as_is(Backend::Primary),
            (Endpoint::Reader, None) => self.forward_as_is(Backend::Replica),
            (Endpoint::Reader, Some(_)) if read && self.readonly => {
                self.forward_as_is(Backend::Replica)
            }
            (Endpoint::Reader, Some(slot)) => Action::Reply(
                Outcome::Moved,
                error(&format!(
                    "MOVED {slot} localhost:{}",
                    self.shared.primary_port
                )),
            ),
        }
    }
}

/// Redis's wording for a command it does not have.
fn unknown_command(args: &[Vec<u8>]) -> String {
    let mut rest = String::new();
    for arg in &args[1..] {
        if rest.len() >= 128 {
            break;
        }
        let arg = String::from_utf8_lossy(arg);
        let room = 128 - rest.len();
        let arg: String = arg.chars().take(room).collect();
        rest.push_str(&format!("'{arg}' "));
    }
    let name: String = String::from_utf8_lossy(&args[0])
        .chars()
        .take(128)
        .collect();
    format!("ERR unknown command '{name}', with args beginning with: {rest}")
}

/// Redis's wording for a subcommand it does not have.
pub(super) fn unknown_subcommand(args: &[Vec<u8>], command: &str) -> String {
    let sub = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    format!("ERR unknown subcommand '{sub}'. Try {command} HELP.")
}

pub(super) fn key_slot(key: &[u8]) -> u16 {
    slot_of(&String::from_utf8_lossy(key))
}

/// Where a command's keys are.
#[derive(Debug, Clone, Copy)]
enum Keys {
    None,
    /// `args[1]`.
    First,
    /// `args[1..3]`.
    FirstTwo,
    /// Every argument.
    All,
    /// Every other argument from the first (`MSET k v k v`).
    Pairs,
    /// `EVAL script numkeys key...`.
    Script,
    /// `OBJECT <sub> key`.
    Second,
}

/// Where the keys of `name` are, and whether it only reads. Commands not listed are taken as
/// writes on their first argument.
fn key_spec(name: &str) -> (Keys, bool) {
    match name {
        "PING" | "ECHO" | "TIME" | "DBSIZE" | "RANDOMKEY" | "COMMAND" | "LOLWUT" | "SCAN"
        | "LASTSAVE" => (Keys::None, true),
        "FLUSHALL" | "FLUSHDB" | "MULTI" | "EXEC" | "DISCARD" | "UNWATCH" | "RESET" | "PUBLISH"
        | "SPUBLISH" | "PUBSUB" => (Keys::None, false),
        "DEL" | "UNLINK" | "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" | "PFMERGE" => {
            (Keys::All, false)
        }
        "WATCH" => (Keys::All, true),
        "EXISTS" | "MGET" | "TOUCH" | "SINTER" | "SUNION" | "SDIFF" | "PFCOUNT" => {
            (Keys::All, true)
        }
        "MSET" | "MSETNX" => (Keys::Pairs, false),
        "RENAME" | "RENAMENX" | "COPY" | "SMOVE" | "LMOVE" | "RPOPLPUSH" | "BLMOVE"
        | "BRPOPLPUSH" => (Keys::FirstTwo, false),
        "EVAL" | "EVALSHA" => (Keys::Script, false),
        "EVAL_RO" | "EVALSHA_RO" => (Keys::Script, true),
        "OBJECT" => (Keys::Second, true),
        "GET" | "STRLEN" | "GETRANGE" | "SUBSTR" | "GETBIT" | "BITCOUNT" | "BITPOS"
        | "BITFIELD_RO" | "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" | "TYPE" | "DUMP"
        | "HGET" | "HMGET" | "HGETALL" | "HEXISTS" | "HLEN" | "HKEYS" | "HVALS" | "HSTRLEN"
        | "HRANDFIELD" | "HSCAN" | "LRANGE" | "LLEN" | "LINDEX" | "LPOS" | "SMEMBERS"
        | "SISMEMBER" | "SMISMEMBER" | "SCARD" | "SRANDMEMBER" | "SSCAN" | "ZRANGE"
        | "ZRANGEBYSCORE" | "ZRANGEBYLEX" | "ZREVRANGE" | "ZREVRANGEBYSCORE" | "ZREVRANGEBYLEX"
        | "ZSCORE" | "ZMSCORE" | "ZCARD" | "ZCOUNT" | "ZLEXCOUNT" | "ZRANK" | "ZREVRANK"
        | "ZRANDMEMBER" | "ZSCAN" | "XRANGE" | "XREVRANGE" | "XLEN" | "GEOPOS" | "GEODIST"
        | "GEOHASH" | "GEOSEARCH" | "SORT_RO" => (Keys::First, true),
        _ => (Keys::First, false),
    }
}

fn keys_of(spec: Keys, args: &[Vec<u8>]) -> Result<Vec<&[u8]>, String> {
    let rest = &args[1..];
    Ok(match spec {
        Keys::None => Vec::new(),
        Keys::First => rest.first().map(Vec::as_slice).into_iter().collect(),
        Keys::Second => rest.get(1).map(Vec::as_slice).into_iter().collect(),
        Keys::FirstTwo => rest.iter().take(2).map(Vec::as_slice).collect(),
        Keys::All => rest.iter().map(Vec::as_slice).collect(),
        Keys::Pairs => rest.iter().step_by(2).map(Vec::as_slice).collect(),
        Keys::Script => {
            let numkeys = rest
                .get(1)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok());
            match numkeys {
                Some(0) => {
                    return Err("ERR Lua scripts without any input keys are not supported".into())
                }
                // Malformed: the backend words the error.
                None => Vec::new(),
                Some(n) => rest.iter().skip(2).take(n).map(Vec::as_slice).collect(),
            }
        }
    })
}
