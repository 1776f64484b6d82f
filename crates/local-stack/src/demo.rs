//! A one-shot walk through the whole system against local services: a price change travels
//! from the table through its stream and the invalidator to the read path.

use std::fmt::Write as _;

use aws_sdk_dynamodb::types::AttributeValue;
use product_cache::cache::RedisCache;
use product_cache::config::{
    CacheSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::invalidate::Invalidator;
use product_cache::read::{Answer, ReadPath};
use product_cache::store::DynamoStore;

use crate::services::{MotoServer, RedisServer};
use crate::stream::{lambda_event, Position, StreamReader};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Local services for the demo: the ones named by `REDIS_URL` / `AWS_ENDPOINT_URL_DYNAMODB`, or
/// children started here (kept alive by this struct, stopped when it drops).
pub struct Services {
    pub redis_url: String,
    pub dynamodb_endpoint: String,
    _redis: Option<RedisServer>,
    _moto: Option<MotoServer>,
}

impl Services {
    /// Whether the Redis is a child started here (so known to be empty).
    pub fn started_redis(&self) -> bool {
        self._redis.is_some()
    }

    pub async fn start() -> Result<Self, Error> {
        let (redis_url, redis) = match std::env::var("REDIS_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let server = RedisServer::start().await?;
                (server.url(), Some(server))
            }
        };
        let (dynamodb_endpoint, moto) = match std::env::var("AWS_ENDPOINT_URL_DYNAMODB") {
            Ok(url) => (url, None),
            Err(_) => {
                let server = MotoServer::start().await?;
                (server.endpoint(), Some(server))
            }
        };
        Ok(Self {
            redis_url,
            dynamodb_endpoint,
            _redis: redis,
            _moto: moto,
        })
    }
}

async fn get(read: &ReadPath<RedisCache, DynamoStore>, id: &str) -> String {
    let answer = Answer::get(read, &format!("/products/{id}")).await;
    format!(
        "{} X-Cache: {}  {}",
        answer.status, answer.x_cache, answer.body
    )
}

/// Runs the walk-through and returns its transcript.
pub async fn run(mode: InvalidationMode) -> Result<String, Error> {
    let services = Services::start().await?;
    let mut out = String::new();
    writeln!(out, "redis:    {}", services.redis_url)?;
    writeln!(out, "dynamodb: {}", services.dynamodb_endpoint)?;

    let sdk = crate::table::local_sdk_config(&services.dynamodb_endpoint).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let settings = CacheSettings::default();
    let table = "Products";
    let stream_arn =
        crate::table::ensure_table(&dynamodb, table, &settings.key_attribute, settings.key_type)
            .await?;
    let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
    let start = stream.read_available(&Position::TrimHorizon).await?;
    let mut last_seq = start
        .last()
        .and_then(|r| r["dynamodb"]["SequenceNumber"].as_str().map(str::to_owned));

    let redis = RedisSettings::new(&services.redis_url);
    let read = ReadSettings::new(redis.clone(), table, settings.clone());
    let read = ReadPath::build(read, &sdk).await?;
    let invalidator = InvalidatorSettings {
        redis,
        mode,
        cache: settings,
    };
    let invalidator = Invalidator::build(invalidator, &sdk).await?;
    if services.started_redis() {
        // A Redis started empty just now: refreshes write from the first record on.
        invalidator.cache().declare_empty().await?;
    }

    let id = "kb-001";
    let put_price = |price: &'static str| {
        dynamodb
            .put_item()
            .table_name(table)
            .item("productId", AttributeValue::S(id.into()))
            .item("name", AttributeValue::S("Mechanical keyboard".into()))
            .item("price", AttributeValue::N(price.into()))
            .send()
    };
    let mut apply_stream = async |out: &mut String| -> Result<(), Error> {
        let position = last_seq
            .clone()
            .map_or(Position::TrimHorizon, Position::After);
        let records = stream.read_available(&position).await?;
        if let Some(last) = records.last() {
            last_seq = last["dynamodb"]["SequenceNumber"]
                .as_str()
                .map(str::to_owned);
        }
        for r in &records {
            writeln!(
                out,
                "  stream record {} {} seq {}",
                r["eventName"].as_str().unwrap_or("?"),
                r["dynamodb"]["Keys"],
                r["dynamodb"]["SequenceNumber"].as_str().unwrap_or("?")
            )?;
        }
        let response = invalidator.handle(lambda_event(records)).await;
        writeln!(
            out,
            "  invalidator ({mode:?} mode) answered {}",
            serde_json::to_string(&response)?
        )?;
        Ok(())
    };

    writeln!(out, "\n1. put {id} at 129.99, apply the stream")?;
    put_price("129.99").await?;
    apply_stream(&mut out).await?;
    writeln!(out, "2. GET /products/{id}  -> {}", get(&read, id).await)?;
    writeln!(out, "3. GET /products/{id}  -> {}", get(&read, id).await)?;
    writeln!(out, "4. change the price to 99.99 in the table")?;
    put_price("99.99").await?;
    writeln!(
        out,
        "5. GET before the stream is applied -> {}",
        get(&read, id).await
    )?;
    writeln!(out, "6. apply the stream")?;
    apply_stream(&mut out).await?;
    writeln!(out, "7. GET /products/{id}  -> {}", get(&read, id).await)?;
    Ok(out)
}
