//! Authentication: `AUTH` and `HELLO ... AUTH` against the cache's [`Auth`], and the form
//! check of an IAM token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::connection::{Action, Backend, Connection};
use super::resp::{encode_request, error};
use super::{Auth, Endpoint, Outcome};

/// How long an IAM token is valid after it was signed (its `X-Amz-Expires`).
const TOKEN_VALIDITY: Duration = Duration::from_secs(900);

impl Connection<'_> {
    pub(super) fn auth(&mut self, args: &[Vec<u8>]) -> Action {
        let (user, secret) = match args {
            [_, password] => ("default".to_owned(), password),
            [_, user, password] => (String::from_utf8_lossy(user).into_owned(), password),
            _ => {
                return Action::Reply(
                    Outcome::Refused,
                    error("ERR wrong number of arguments for 'auth' command"),
                )
            }
        };
        self.check_auth(&user, &String::from_utf8_lossy(secret))
    }

    fn check_auth(&mut self, user: &str, secret: &str) -> Action {
        let ok = match &self.shared.auth {
            Auth::None => true,
            Auth::Password {
                user: expected,
                password,
            } => user == expected && secret == password,
            Auth::Iam {
                user: expected,
                cache_name,
                region,
            } => {
                user == expected
                    && iam_token_is_valid(secret, expected, cache_name, region, SystemTime::now())
            }
        };
        if ok {
            self.authenticated = true;
            Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec())
        } else {
            Action::Reply(
                Outcome::Refused,
                error("WRONGPASS invalid username-password pair or user is disabled."),
            )
        }
    }

    /// `HELLO [2 [AUTH user pass] [SETNAME name]]`: protocol 2 only; the AUTH part is the
    /// front's, the rest goes to the backend.
    pub(super) fn hello(&mut self, args: &[Vec<u8>]) -> Action {
        let mut forward: Vec<Vec<u8>> = vec![b"HELLO".to_vec()];
        if let Some(version) = args.get(1) {
            if version.as_slice() != b"2" {
                return Action::Reply(
                    Outcome::Refused,
                    error("NOPROTO sorry, this protocol version is not supported."),
                );
            }
            forward.push(version.clone());
        }
        let mut i = 2;
        while i < args.len() {
            let option = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
            match option.as_str() {
                "AUTH" if i + 2 < args.len() => {
                    let user = String::from_utf8_lossy(&args[i + 1]).into_owned();
                    let secret = String::from_utf8_lossy(&args[i + 2]).into_owned();
                    if let Action::Reply(Outcome::Refused, reply) = self.check_auth(&user, &secret)
                    {
                        return Action::Reply(Outcome::Refused, reply);
                    }
                    i += 3;
                }
                "SETNAME" if i + 1 < args.len() => {
                    forward.extend([args[i].clone(), args[i + 1].clone()]);
                    i += 2;
                }
                _ => {
                    return Action::Reply(
                        Outcome::Refused,
                        error(&format!("ERR Syntax error in HELLO option '{option}'")),
                    )
                }
            }
        }
        if !self.authenticated {
            return Action::Reply(
                Outcome::Refused,
                error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"),
            );
        }
        let backend = match self.endpoint {
            Endpoint::Primary => Backend::Primary,
            Endpoint::Reader => Backend::Replica,
        };
        Action::Forward {
            backend,
            request: encode_request(&forward),
        }
    }
}

/// Whether `token` is an IAM token of the serverless form for `user` on `cache_name` in
/// `region`, signed within [`TOKEN_VALIDITY`] of `now`. The signature's form is checked, not
/// its value.
pub fn iam_token_is_valid(
    token: &str,
    user: &str,
    cache_name: &str,
    region: &str,
    now: SystemTime,
) -> bool {
    let Some(query) = token.strip_prefix(&format!("{cache_name}/?")) else {
        return false;
    };
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let params: Vec<(&str, &str)> = query
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
    let mut expected = vec![
        "Action",
        "User",
        "ResourceType",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
    ];
    if names.contains(&"X-Amz-Security-Token") {
        expected.push("X-Amz-Security-Token");
    }
    expected.push("X-Amz-Signature");
    if names != expected {
        return false;
    }
    let value = |name: &str| {
        params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_default()
    };
    let date = value("X-Amz-Date");
    let Some(signed) = parse_amz_date(date) else {
        return false;
    };
    let age = match now.duration_since(signed) {
        Ok(age) => age,
        Err(ahead) => ahead.duration(),
    };
    let credential = decode(value("X-Amz-Credential"));
    let scope: Vec<&str> = credential.split('/').collect();
    let signature = value("X-Amz-Signature");
    value("Action") == "connect"
        && decode(value("User")) == user
        && value("ResourceType") == "ServerlessCache"
        && value("X-Amz-Algorithm") == "AWS4-HMAC-SHA256"
        && scope.len() == 5
        && !scope[0].is_empty()
        && scope[1] == &date[..8]
        && scope[2] == region
        && scope[3] == "elasticache"
        && scope[4] == "aws4_request"
        && age <= TOKEN_VALIDITY
        && value("X-Amz-Expires") == TOKEN_VALIDITY.as_secs().to_string()
        && value("X-Amz-SignedHeaders") == "host"
        && signature.len() == 64
        && signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(date: &str) -> Option<SystemTime> {
    let b = date.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { date.get(range)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3_600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_parse() {
        let t = parse_amz_date("20240102T030405Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        assert!(parse_amz_date("20241302T030405Z").is_none());
    }
}
