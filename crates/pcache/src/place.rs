//! Where an operator command acts: the running local stack (found by its state file), local
//! endpoints given by hand, or real AWS through the standard SDK configuration (`--region`,
//! `--profile`, the environment), with Redis and the key mapping from the same variables the
//! functions read (`REDIS_URL`, `REDIS_CLUSTER`, `REDIS_AUTH_SECRET_ARN`, `KEY_ATTRIBUTE`, ...).

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;
use local_stack::stack::StackState;
use product_cache::config::{AwsTimeouts, CacheSettings, Env, ReadSettings, RedisSettings, Source};

use crate::cli::Target;
use crate::commands::Error;

/// A command's DynamoDB (and Streams, SQS), table, Redis and key mapping.
pub struct Place {
    pub sdk: SdkConfig,
    pub table: String,
    pub redis: RedisSettings,
    pub settings: CacheSettings,
    /// Said in the command's output, so an operator sees which system was touched.
    pub description: String,
}

impl Place {
    pub fn read_settings(&self) -> ReadSettings {
        ReadSettings::new(self.redis.clone(), &self.table, self.settings.clone())
    }
}

/// The environment with `REDIS_URL` given on the command line in front of it.
struct WithRedisUrl<'a>(Option<&'a str>);

impl Source for WithRedisUrl<'_> {
    fn get(&self, name: &str) -> Option<String> {
        match (name, self.0) {
            ("REDIS_URL", Some(url)) => Some(url.to_owned()),
            _ => Env.get(name),
        }
    }
}

impl Target {
    /// Real AWS when `--region` or `--profile` is given, or when `--table` (or `TABLE_NAME`) is
    /// given with neither `--endpoint` nor a running stack; otherwise the local stack, with
    /// `--endpoint` and `--redis-url` taking the place of what its state file says.
    pub async fn place(&self) -> Result<Place, Error> {
        let settings = CacheSettings::from_source(&Env)?;
        let table = self.table.clone().or_else(|| Env.get("TABLE_NAME"));
        let state = StackState::read(&self.state_dir);
        let aws = self.region.is_some()
            || self.profile.is_some()
            || (self.endpoint.is_none() && state.is_err() && table.is_some());
        if aws {
            let table = table.ok_or("--table (or TABLE_NAME) names the table on AWS")?;
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
            if let Some(region) = &self.region {
                loader = loader.region(aws_config::Region::new(region.clone()));
            }
            if let Some(profile) = &self.profile {
                loader = loader.profile_name(profile);
            }
            if let Some(endpoint) = &self.endpoint {
                loader = loader.endpoint_url(endpoint);
            }
            let sdk = self.with_timeouts(loader.load().await);
            let redis = RedisSettings::from_source(&WithRedisUrl(self.redis_url.as_deref()))?;
            let region = sdk.region().map_or("(no region)".into(), |r| r.to_string());
            return Ok(Place {
                description: format!("table {table} in {region}, Redis {}", redacted(&redis.url)),
                sdk,
                table,
                redis,
                settings,
            });
        }
        let state = match (&self.endpoint, &self.redis_url) {
            (Some(_), Some(_)) => None,
            _ => Some(state?),
        };
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| state.as_ref().map(|s| s.dynamodb_endpoint.clone()))
            .unwrap_or_default();
        let redis_url = self
            .redis_url
            .clone()
            .or_else(|| state.as_ref().map(|s| s.redis_url.clone()))
            .unwrap_or_default();
        let table = table
            .or_else(|| state.as_ref().map(|s| s.table.clone()))
            .unwrap_or_else(|| local_stack::stack::DEFAULT_TABLE.into());
        let settings = CacheSettings {
            key_attribute: state
                .as_ref()
                .map_or(settings.key_attribute.clone(), |s| s.key_attribute.clone()),
            ..settings
        };
        Ok(Place {
            description: format!("table {table} at {endpoint}, Redis {redis_url}"),
            sdk: self.with_timeouts(local_stack::table::local_sdk_config(&endpoint).await),
            // The functions' settings (REDIS_CLUSTER, REDIS_CONFIRM_REPLICAS, ...) with this URL,
            // as on AWS: a redrive confirms its writes by the invalidator's rule.
            redis: RedisSettings::from_source(&WithRedisUrl(Some(&redis_url)))?,
            table,
            settings,
        })
    }
}

impl Target {
    /// `sdk` with this command's bounds on AWS calls: an attempt that hangs (a dead connection,
    /// an endpoint that never answers) is abandoned after `--aws-attempt-timeout-ms` and
    /// retried, and a call with its retries ends after `--aws-timeout-ms`, so an operator
    /// command reports a failure instead of hanging. The SDK's connect timeout is kept.
    fn with_timeouts(&self, sdk: SdkConfig) -> SdkConfig {
        let bounds = product_cache::startup::aws_timeouts(&AwsTimeouts {
            attempt: Duration::from_millis(self.aws_attempt_timeout_ms),
            operation: Duration::from_millis(self.aws_timeout_ms),
        });
        let timeouts = bounds
            .to_builder()
            .take_unset_from(
                sdk.timeout_config()
                    .cloned()
                    .unwrap_or_else(TimeoutConfig::disabled)
                    .into(),
            )
            .build();
        sdk.to_builder().timeout_config(timeouts).build()
    }
}

/// A Redis URL without its password, for output.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            super::redacted("rediss://user:secret@host:6379"),
            "rediss://***@host:6379"
        );
        assert_eq!(super::redacted("redis://host:6379"), "redis://host:6379");
    }
}
