//! ElastiCache IAM authentication: the password is a short-lived token the function signs itself
//! with its role's credentials, instead of an AUTH token kept in Secrets Manager.
//!
//! The token is a SigV4 presigned request (query-string signing) of
//! `GET http://<replication group id>/?Action=connect&User=<user id>` for the service
//! `elasticache` in the cache's Region, valid for 15 minutes ([`TOKEN_VALIDITY`]), without the
//! `http://`. For a serverless cache the host is the cache's name and the request also says
//! `&ResourceType=ServerlessCache` (AWS's "Authenticating with IAM"): a node-based token is
//! refused there. The user id is the AUTH username. No AWS SDK ships a generator (aws/aws-sdk#580),
//! so [`token`] builds it with the SDK's own signer (`aws-sigv4`); a test compares it byte for
//! byte with botocore's presigner for the same inputs.
//!
//! [`IamCredentials`] hands the tokens to redis-rs as a
//! [`StreamingCredentialsProvider`]. Every subscription (redis-rs subscribes once for each new
//! connection, cluster nodes included, and on every reconnect) starts with a token signed at
//! that moment with credentials fetched then, and yields a fresh one every [`REFRESH`] (10
//! minutes, well inside the 15), on which redis-rs re-AUTHs the live connection. ElastiCache
//! closes an IAM-authenticated connection after 12 hours unless it is re-authenticated with a
//! new token, which this refresh does; a connection closed anyway (a failover, a frozen
//! Lambda environment) reconnects with a token signed at the reconnect, and the read path
//! retries its `GET` once on the new connection.
//!
//! The clock and the credentials come from the [`SdkConfig`] (its time source and credentials
//! provider, the role's credentials in Lambda), so tests can control both; the refresh timer is
//! tokio's, so tests can pause it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_async::time::SharedTimeSource;
use futures::{Stream, StreamExt as _};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use redis::auth::{BasicAuth, StreamingCredentialsProvider};

use crate::config::IamSettings;

/// How long a token may be used to authenticate (`X-Amz-Expires`): ElastiCache's maximum.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(900);

/// How often a subscription yields a fresh token: well before the last one expires.
pub const REFRESH: Duration = Duration::from_secs(600);

/// How soon a refresh whose credentials could not be fetched is tried again. The connection
/// stays authenticated meanwhile; only its 12-hour extension waits.
pub const RETRY: Duration = Duration::from_secs(15);

/// The service name ElastiCache tokens are signed for.
const SERVICE: &str = "elasticache";

/// SigV4's URI encoding: everything but the unreserved characters (RFC 3986), as botocore's
/// `percent_encode` does.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What a token is signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The Region of the cache.
    pub region: String,
    /// The replication group id, or the serverless cache's name (the host of the signed
    /// request).
    pub cache: String,
    /// The cache is serverless: `ResourceType=ServerlessCache` is signed too.
    pub serverless: bool,
    /// The IAM-enabled ElastiCache user's id, which is also the AUTH username.
    pub user_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("REDIS_IAM_USER needs a Region for the token (set AWS_REGION)")]
    NoRegion,
    #[error("REDIS_IAM_USER needs AWS credentials to sign the token, and the SDK has no credentials provider")]
    NoCredentialsProvider,
    #[error("fetching AWS credentials for the ElastiCache IAM token failed")]
    Credentials(#[source] aws_credential_types::provider::error::CredentialsError),
    #[error("signing the ElastiCache IAM token failed: {0}")]
    Signing(String),
}

impl IamError {
    /// The error and every source under it, on one line (the credentials chain's reason is
    /// only in its sources).
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            text.push_str(&format!(": {e}"));
            source = e.source();
        }
        text
    }
}

impl From<IamError> for redis::RedisError {
    fn from(e: IamError) -> Self {
        redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "ElastiCache IAM token",
            e.chain(),
        ))
    }
}

/// The token for `target`, signed with `credentials` at `at`: a pure function of its inputs.
///
/// `<cache>/?Action=connect&User=<user>[&ResourceType=ServerlessCache]
/// &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=...&X-Amz-Date=...&X-Amz-Expires=900
/// &X-Amz-SignedHeaders=host[&X-Amz-Security-Token=...]&X-Amz-Signature=...`, the parameters
/// in botocore's order.
pub fn token(
    target: &Target,
    credentials: &Credentials,
    at: SystemTime,
) -> Result<String, IamError> {
    let encode = |s: &str| utf8_percent_encode(s, UNRESERVED).to_string();
    let mut resource = format!(
        "{}/?Action=connect&User={}",
        target.cache,
        encode(&target.user_id)
    );
    if target.serverless {
        resource.push_str("&ResourceType=ServerlessCache");
    }
    let url = format!("http://{resource}");
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_VALIDITY);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name(SERVICE)
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into();
    let request = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| IamError::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into_parts();
    let mut token = resource;
    let mut signature = None;
    for (name, value) in instructions.params() {
        if *name == "X-Amz-Signature" {
            signature = Some(value);
            continue;
        }
        token.push_str(&format!("&{name}={}", encode(value)));
    }
    let signature = signature.ok_or_else(|| IamError::Signing("no signature".into()))?;
    token.push_str(&format!("&X-Amz-Signature={signature}"));
    Ok(token)
}

/// The redis-rs credentials provider of an IAM-authenticated cache: see the module docs.
#[derive(Clone)]
pub struct IamCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    credentials: SharedCredentialsProvider,
    clock: SharedTimeSource,
    refresh: Duration,
    retry: Duration,
}

impl std::fmt::Debug for IamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamCredentials")
            .field("target", &self.inner.target)
            .field("refresh", &self.inner.refresh)
            .finish_non_exhaustive()
    }
}

impl IamCredentials {
    /// Tokens for `target`, signed with credentials from `credentials` at `clock`'s time, a
    /// fresh one every [`REFRESH`] and [`RETRY`] after a failed fetch.
    pub fn new(
        target: Target,
        credentials: SharedCredentialsProvider,
        clock: SharedTimeSource,
    ) -> Self {
        Self::with_intervals(target, credentials, clock, REFRESH, RETRY)
    }

    /// [`IamCredentials::new`] with other intervals than the defaults.
    pub fn with_intervals(
        target: Target,
        credentials: SharedCredentialsProvider,
        clock: SharedTimeSource,
        refresh: Duration,
        retry: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                credentials,
                clock,
                refresh,
                retry,
            }),
        }
    }

    /// For the user and cache `settings` name, in the SDK's Region, with the SDK's
    /// credentials provider (the function's role) and clock.
    pub fn from_sdk(settings: &IamSettings, sdk: &SdkConfig) -> Result<Self, IamError> {
        let region = sdk.region().ok_or(IamError::NoRegion)?;
        let credentials = sdk
            .credentials_provider()
            .ok_or(IamError::NoCredentialsProvider)?;
        let target = Target {
            region: region.to_string(),
            cache: settings.cache.clone(),
            serverless: settings.serverless,
            user_id: settings.user_id.clone(),
        };
        Ok(Self::new(
            target,
            credentials,
            sdk.time_source().unwrap_or_default(),
        ))
    }

    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The AUTH username and a token signed now with freshly fetched credentials.
    pub async fn auth(&self) -> Result<BasicAuth, IamError> {
        self.inner.auth().await
    }
}

impl Inner {
    async fn auth(&self) -> Result<BasicAuth, IamError> {
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .map_err(IamError::Credentials)?;
        let token = token(&self.target, &credentials, self.clock.now())?;
        Ok(BasicAuth::new(self.target.user_id.clone(), token))
    }
}

/// Where a subscription is: before its first token, or due to wait this long before the next.
enum Next {
    First,
    After(Duration),
}

impl StreamingCredentialsProvider for IamCredentials {
    /// A token now, then a fresh one every `refresh`. The first fetch's failure is the
    /// stream's first item (the connection attempt fails with it and is retried by the
    /// client); a later one is logged and retried every `retry`, since the connection is
    /// authenticated already.
    fn subscribe(
        &self,
    ) -> Pin<Box<dyn Stream<Item = redis::RedisResult<BasicAuth>> + Send + 'static>> {
        let inner = self.inner.clone();
        futures::stream::unfold((inner, Next::First), |(inner, next)| async move {
            let first = match next {
                Next::First => true,
                Next::After(wait) => {
                    tokio::time::sleep(wait).await;
                    false
                }
            };
            loop {
                match inner.auth().await {
                    Ok(auth) => {
                        let next = Next::After(inner.refresh);
                        return Some((Ok(auth), (inner, next)));
                    }
                    Err(e) if first => {
                        tracing::warn!(error = e.chain(), "no ElastiCache IAM token for a new connection");
                        let next = Next::After(inner.retry);
                        return Some((Err(e.into()), (inner, next)));
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = e.chain(),
                            retry_in = ?inner.retry,
                            "refreshing the ElastiCache IAM token failed; the connection stays authenticated"
                        );
                        tokio::time::sleep(inner.retry).await;
                    }
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::provider::error::CredentialsError;
    use aws_credential_types::provider::future;
    use aws_smithy_async::time::TimeSource;

    use super::*;

    /// 2024-05-06 07:08:09 UTC, the fixed signing time.
    const AT: u64 = 1_714_979_289;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(AT)
    }

    fn target() -> Target {
        Target {
            region: "eu-west-1".into(),
            cache: "product-cache".into(),
            serverless: false,
            user_id: "product-cache-iam".into(),
        }
    }

    fn serverless() -> Target {
        Target {
            cache: "product-cache-sls".into(),
            serverless: true,
            ..target()
        }
    }

    fn credentials() -> Credentials {
        Credentials::new(
            "ASIAEXAMPLEKEYID0001",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            Some(
                "IQoJb3JpZ2luX2VjEXAMPLE//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+session/token=".into(),
            ),
            None,
            "fixed",
        )
    }

    /// The reference, computed once with botocore 1.44.8 by `tests/fixtures/iam/reference.py`
    /// for the inputs above (and checked again live by `matches_botocore_when_available`).
    const REFERENCE: &str = include_str!("../../../tests/fixtures/iam/token-session.txt");
    const REFERENCE_NO_SESSION: &str =
        include_str!("../../../tests/fixtures/iam/token-no-session.txt");
    const REFERENCE_SERVERLESS: &str =
        include_str!("../../../tests/fixtures/iam/token-serverless.txt");

    fn no_session() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "fixed",
        )
    }

    #[test]
    fn the_token_equals_the_stored_botocore_reference() {
        assert_eq!(
            token(&target(), &credentials(), at()).unwrap(),
            REFERENCE.trim()
        );
        assert_eq!(
            token(&target(), &no_session(), at()).unwrap(),
            REFERENCE_NO_SESSION.trim()
        );
        assert_eq!(
            token(&serverless(), &credentials(), at()).unwrap(),
            REFERENCE_SERVERLESS.trim()
        );
    }

    #[test]
    fn a_serverless_token_names_its_resource_type_and_signs_it() {
        let t = token(&serverless(), &credentials(), at()).unwrap();
        assert!(
            t.starts_with(
                "product-cache-sls/?Action=connect&User=product-cache-iam&ResourceType=ServerlessCache&X-Amz-Algorithm=AWS4-HMAC-SHA256&"
            ),
            "{t}"
        );
        // The same cache name signed as a replication group is another token.
        let nodes = Target {
            serverless: false,
            ..serverless()
        };
        let n = token(&nodes, &credentials(), at()).unwrap();
        assert!(!n.contains("ResourceType"), "{n}");
        assert_ne!(
            t.rsplit_once("&X-Amz-Signature=").unwrap().1,
            n.rsplit_once("&X-Amz-Signature=").unwrap().1
        );
    }

    #[test]
    fn the_token_has_the_documented_shape() {
        let t = token(&target(), &credentials(), at()).unwrap();
        assert!(
            t.starts_with("product-cache/?Action=connect&User=product-cache-iam&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAEXAMPLEKEYID0001%2F20240506%2Feu-west-1%2Felasticache%2Faws4_request&X-Amz-Date=20240506T070809Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Security-Token="),
            "{t}"
        );
        assert!(!t.contains("http"), "{t}");
        let signature = t.rsplit_once("&X-Amz-Signature=").unwrap().1;
        assert_eq!(signature.len(), 64);
        // Every input is signed: changing any one changes the signature.
        let other = |t: Target, c: Credentials, when: SystemTime| token(&t, &c, when).unwrap();
        let base = other(target(), credentials(), at());
        let later = at() + Duration::from_secs(1);
        assert_ne!(base, other(target(), credentials(), later));
        let region = Target {
            region: "us-east-1".into(),
            ..target()
        };
        assert_ne!(base, other(region, credentials(), at()));
        let group = Target {
            cache: "other".into(),
            ..target()
        };
        assert_ne!(base, other(group, credentials(), at()));
    }

    /// botocore's presigner for the same request, run with the test venv's python, when there
    /// is one (scripts/setup.sh pins botocore into .venv). The stored reference above keeps
    /// the comparison where it is not.
    #[test]
    fn matches_botocore_when_available() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let python = format!("{root}/.venv/bin/python");
        let script = format!("{root}/tests/fixtures/iam/reference.py");
        if !std::path::Path::new(&python).exists() {
            eprintln!("no {python}: compared with the stored reference only");
            return;
        }
        for (t, creds, with_session) in [
            (target(), credentials(), true),
            (target(), no_session(), false),
            (serverless(), credentials(), true),
        ] {
            let mut cmd = std::process::Command::new(&python);
            cmd.arg(&script)
                .args(["--region", &t.region])
                .args(["--group", &t.cache])
                .args(["--user", &t.user_id])
                .args(["--access-key", creds.access_key_id()])
                .args(["--secret-key", creds.secret_access_key()])
                .args(["--time", &AT.to_string()]);
            if let Some(session) = creds.session_token() {
                cmd.args(["--session-token", session]);
            }
            if t.serverless {
                cmd.arg("--serverless");
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let botocore = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                token(&t, &creds, at()).unwrap(),
                botocore.trim(),
                "session token: {with_session}, serverless: {}",
                t.serverless
            );
        }
    }

    /// Wall-clock time that advances with tokio's (paused) clock.
    #[derive(Debug)]
    struct TokioClock {
        base: SystemTime,
        start: tokio::time::Instant,
    }

    impl TimeSource for TokioClock {
        fn now(&self) -> SystemTime {
            self.base + self.start.elapsed()
        }
    }

    /// Credentials that fail on the fetches whose numbers (from 0) are in `fail`.
    #[derive(Debug)]
    struct Flaky {
        calls: Arc<AtomicUsize>,
        fail: Vec<usize>,
    }

    impl aws_credential_types::provider::ProvideCredentials for Flaky {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            future::ProvideCredentials::ready(if self.fail.contains(&n) {
                Err(CredentialsError::provider_error(
                    "metadata service unavailable",
                ))
            } else {
                Ok(credentials())
            })
        }
    }

    /// A provider over [`Flaky`] credentials and a [`TokioClock`], and its count of fetches.
    fn provider(fail: Vec<usize>) -> (IamCredentials, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let flaky = Flaky {
            calls: calls.clone(),
            fail,
        };
        let clock = TokioClock {
            base: at(),
            start: tokio::time::Instant::now(),
        };
        let provider = IamCredentials::new(
            target(),
            SharedCredentialsProvider::new(flaky),
            SharedTimeSource::new(clock),
        );
        (provider, calls)
    }

    /// The next item and how long (paused) time advanced until it came.
    async fn next(
        stream: &mut (impl Stream<Item = redis::RedisResult<BasicAuth>> + Unpin),
    ) -> (redis::RedisResult<BasicAuth>, Duration) {
        let start = tokio::time::Instant::now();
        let item = stream.next().await.expect("the stream never ends");
        (item, start.elapsed())
    }

    fn signed_at(password: &str) -> String {
        let date = password.split("X-Amz-Date=").nth(1).unwrap();
        date[..16].to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_token_now_and_every_refresh_interval() {
        let (provider, flaky) = provider(vec![]);
        let mut stream = provider.subscribe();
        let (first, waited) = next(&mut stream).await;
        let first = first.unwrap();
        assert_eq!(waited, Duration::ZERO);
        assert_eq!(first.username(), "product-cache-iam");
        assert_eq!(first.password(), REFERENCE.trim());

        let (second, waited) = next(&mut stream).await;
        let second = second.unwrap();
        assert_eq!(waited, REFRESH);
        assert!(
            REFRESH < TOKEN_VALIDITY,
            "the token must be replaced before it expires"
        );
        assert_eq!(signed_at(second.password()), "20240506T071809Z");
        assert_eq!(
            second.password(),
            token(&target(), &credentials(), at() + REFRESH).unwrap()
        );
        let (third, waited) = next(&mut stream).await;
        assert_eq!(waited, REFRESH);
        assert_eq!(signed_at(third.unwrap().password()), "20240506T072809Z");
        // Credentials are fetched for every token, not cached here.
        assert_eq!(flaky.load(Ordering::SeqCst), 3);

        // A new subscription (a new connection, a reconnect) starts with a token signed now.
        let (fresh, waited) = next(&mut provider.subscribe()).await;
        assert_eq!(waited, Duration::ZERO);
        assert_eq!(signed_at(fresh.unwrap().password()), "20240506T072809Z");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_is_retried_and_yields_a_fresh_token() {
        // The first refresh (fetch 1) and its first retry (fetch 2) fail.
        let (provider, flaky) = provider(vec![1, 2]);
        let mut stream = provider.subscribe();
        assert!(next(&mut stream).await.0.is_ok());
        let (refreshed, waited) = next(&mut stream).await;
        assert_eq!(waited, REFRESH + 2 * RETRY);
        assert_eq!(
            refreshed.unwrap().password(),
            token(&target(), &credentials(), at() + REFRESH + 2 * RETRY).unwrap()
        );
        assert_eq!(flaky.load(Ordering::SeqCst), 4);
        // And the schedule goes on from the successful refresh.
        assert_eq!(next(&mut stream).await.1, REFRESH);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_fetch_fails_the_connection_attempt() {
        let (provider, _) = provider(vec![0]);
        let mut stream = provider.subscribe();
        let (first, waited) = next(&mut stream).await;
        assert_eq!(waited, Duration::ZERO);
        let err = first.unwrap_err();
        assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed);
        assert!(
            err.to_string().contains("metadata service unavailable"),
            "{err}"
        );
        // The next connection attempt subscribes again and gets a token.
        assert!(next(&mut provider.subscribe()).await.0.is_ok());
    }

    #[tokio::test]
    async fn built_from_the_sdk_config_with_its_region_clock_and_credentials() {
        let settings = IamSettings {
            user_id: "product-cache-iam".into(),
            cache: "product-cache".into(),
            serverless: false,
        };
        let sdk = SdkConfig::builder()
            .region(aws_config::Region::new("eu-west-1"))
            .credentials_provider(SharedCredentialsProvider::new(credentials()))
            .time_source(aws_smithy_async::time::StaticTimeSource::new(at()))
            .build();
        let provider = IamCredentials::from_sdk(&settings, &sdk).unwrap();
        assert_eq!(provider.target(), &target());
        assert_eq!(provider.auth().await.unwrap().password(), REFERENCE.trim());

        let no_region = SdkConfig::builder()
            .credentials_provider(SharedCredentialsProvider::new(credentials()))
            .build();
        let err = IamCredentials::from_sdk(&settings, &no_region).unwrap_err();
        assert!(err.to_string().contains("AWS_REGION"), "{err}");
        let no_credentials = SdkConfig::builder()
            .region(aws_config::Region::new("eu-west-1"))
            .build();
        assert!(matches!(
            IamCredentials::from_sdk(&settings, &no_credentials),
            Err(IamError::NoCredentialsProvider)
        ));
    }
}
