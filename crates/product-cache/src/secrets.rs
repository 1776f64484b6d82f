//! The Redis AUTH token from Secrets Manager, read once at cold start, so it never sits in the
//! template, a parameter or a plain environment variable.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading secret {arn} failed")]
    Fetch {
        arn: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("secret {0} has no SecretString, or its JSON has no `token` or `password` field")]
    NoToken(String),
    #[error("REDIS_URL must not carry credentials when REDIS_AUTH_SECRET_ARN is set")]
    UrlHasCredentials,
    #[error("REDIS_URL {0:?} is not a redis:// or rediss:// URL")]
    BadUrl(String),
}

/// The token in a SecretString: the string itself, or the `token` (else `password`) field of a
/// JSON object, the shape a CloudFormation-generated secret has.
pub fn token_of(secret_string: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(secret_string) {
        Ok(serde_json::Value::Object(map)) => ["token", "password"]
            .iter()
            .find_map(|k| map.get(*k).and_then(|v| v.as_str()).map(str::to_owned)),
        _ => Some(secret_string.to_owned()).filter(|s| !s.is_empty()),
    }
}

/// `url` with `token` as its password (`rediss://:token@host:port`), percent-encoded.
pub fn with_password(url: &str, token: &str) -> Result<String, SecretError> {
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| *s == "redis" || *s == "rediss")
        .ok_or_else(|| SecretError::BadUrl(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(SecretError::UrlHasCredentials);
    }
    let token = utf8_percent_encode(token, NON_ALPHANUMERIC);
    Ok(format!("{scheme}://:{token}@{rest}"))
}

/// Fetches the token from Secrets Manager.
pub async fn fetch_token(
    client: &aws_sdk_secretsmanager::Client,
    arn: &str,
) -> Result<String, SecretError> {
    let out = client
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| SecretError::Fetch {
            arn: arn.to_owned(),
            source: Box::new(e),
        })?;
    out.secret_string()
        .and_then(token_of)
        .ok_or_else(|| SecretError::NoToken(arn.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_plain_or_json_secrets() {
        assert_eq!(token_of("s3cr3t").as_deref(), Some("s3cr3t"));
        assert_eq!(token_of(r#"{"token":"abc"}"#).as_deref(), Some("abc"));
        assert_eq!(token_of(r#"{"password":"p"}"#).as_deref(), Some("p"));
        assert_eq!(token_of(r#"{"user":"u"}"#), None);
        assert_eq!(token_of(""), None);
    }

    #[test]
    fn the_token_is_percent_encoded_into_the_url() {
        assert_eq!(
            with_password("rediss://cfg.cache.amazonaws.com:6379", "a+b#c").unwrap(),
            "rediss://:a%2Bb%23c@cfg.cache.amazonaws.com:6379"
        );
        assert!(matches!(
            with_password("rediss://u:p@h:6379", "t"),
            Err(SecretError::UrlHasCredentials)
        ));
        assert!(matches!(
            with_password("http://h", "t"),
            Err(SecretError::BadUrl(_))
        ));
    }
}
