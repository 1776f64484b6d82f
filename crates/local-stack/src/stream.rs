//! Reading a table's DynamoDB Stream with the Streams API, and turning its records into the
//! event JSON Lambda's event source mapping hands to a function.

use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use serde_json::{json, Map, Value};

/// A failed DynamoDB Streams call.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB Streams {operation} failed")]
pub struct StreamError {
    pub operation: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn stream_error<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> StreamError {
    move |e| StreamError {
        operation,
        source: Box::new(e),
    }
}

/// Where to start reading a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    TrimHorizon,
    Latest,
    At(String),
    After(String),
}

/// One shard of the stream, as `DescribeStream` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard_id: String,
    pub parent_shard_id: Option<String>,
    /// A closed shard has an ending sequence number and, once read to its end, no next iterator.
    pub closed: bool,
}

/// A stream of one table.
#[derive(Clone)]
pub struct StreamReader {
    client: aws_sdk_dynamodbstreams::Client,
    stream_arn: String,
}

impl StreamReader {
    pub fn new(client: aws_sdk_dynamodbstreams::Client, stream_arn: impl Into<String>) -> Self {
        Self {
            client,
            stream_arn: stream_arn.into(),
        }
    }

    pub fn stream_arn(&self) -> &str {
        &self.stream_arn
    }

    /// Every shard of the stream, following `LastEvaluatedShardId` pagination.
    pub async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(stream_error("DescribeStream"))?;
            let Some(desc) = out.stream_description else {
                break;
            };
            for s in desc.shards.unwrap_or_default() {
                shards.push(ShardInfo {
                    shard_id: s.shard_id.unwrap_or_default(),
                    parent_shard_id: s.parent_shard_id,
                    closed: s
                        .sequence_number_range
                        .is_some_and(|r| r.ending_sequence_number.is_some()),
                });
            }
            match desc.last_evaluated_shard_id {
                Some(last) => start = Some(last),
                None => break,
            }
        }
        Ok(shards)
    }

    pub async fn iterator(
        &self,
        shard_id: &str,
        position: &Position,
    ) -> Result<Option<String>, StreamError> {
        let (kind, seq) = match position {
            Position::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
            Position::Latest => (ShardIteratorType::Latest, None),
            Position::At(s) => (ShardIteratorType::AtSequenceNumber, Some(s.clone())),
            Position::After(s) => (ShardIteratorType::AfterSequenceNumber, Some(s.clone())),
        };
        let out = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard_id)
            .shard_iterator_type(kind)
            .set_sequence_number(seq)
            .send()
            .await
            .map_err(stream_error("GetShardIterator"))?;
        Ok(out.shard_iterator)
    }

    /// One `GetRecords` call: the records as Lambda event records, and the next iterator (`None`
    /// once a closed shard is exhausted).
    pub async fn read(
        &self,
        iterator: &str,
        limit: i32,
    ) -> Result<(Vec<Value>, Option<String>), StreamError> {
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(stream_error("GetRecords"))?;
        let records = out
            .records
            .unwrap_or_default()
            .iter()
            .map(|r| lambda_record(r, &self.stream_arn))
            .collect();
        Ok((records, out.next_shard_iterator))
    }

    /// Reads every shard from `position` until each is drained for now, in stream order per
    /// shard. For tests and one-shot replays; the poller reads continuously instead.
    pub async fn read_available(&self, position: &Position) -> Result<Vec<Value>, StreamError> {
        let mut all = Vec::new();
        for shard in self.shards().await? {
            let mut next = self.iterator(&shard.shard_id, position).await?;
            while let Some(it) = next {
                let (records, following) = self.read(&it, 1000).await?;
                if records.is_empty() {
                    break;
                }
                all.extend(records);
                next = following;
            }
        }
        Ok(all)
    }
}

/// A stream record as Lambda delivers it inside `{"Records": [...]}`.
pub fn lambda_record(record: &Record, stream_arn: &str) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.to_owned(), v);
        }
    };
    put("eventID", record.event_id.clone().map(Value::from));
    put(
        "eventName",
        record.event_name.as_ref().map(|n| Value::from(n.as_str())),
    );
    put(
        "eventVersion",
        record.event_version.clone().map(Value::from),
    );
    put("eventSource", record.event_source.clone().map(Value::from));
    put("awsRegion", record.aws_region.clone().map(Value::from));
    if let Some(d) = &record.dynamodb {
        let mut change = Map::new();
        if let Some(t) = d.approximate_creation_date_time {
            change.insert("ApproximateCreationDateTime".into(), json!(t.as_secs_f64()));
        }
        let image = |m: &Option<std::collections::HashMap<String, _>>| {
            m.clone().map(|m| {
                let item: serde_dynamo::Item = m.into();
                serde_json::to_value(item).expect("attribute values serialise")
            })
        };
        for (name, value) in [
            ("Keys", image(&d.keys)),
            ("NewImage", image(&d.new_image)),
            ("OldImage", image(&d.old_image)),
        ] {
            if let Some(v) = value {
                change.insert(name.into(), v);
            }
        }
        if let Some(s) = &d.sequence_number {
            change.insert("SequenceNumber".into(), json!(s));
        }
        if let Some(s) = d.size_bytes {
            change.insert("SizeBytes".into(), json!(s));
        }
        if let Some(v) = &d.stream_view_type {
            change.insert("StreamViewType".into(), json!(v.as_str()));
        }
        out.insert("dynamodb".into(), Value::Object(change));
    }
    out.insert("eventSourceARN".into(), json!(stream_arn));
    if let Some(u) = &record.user_identity {
        out.insert(
            "userIdentity".into(),
            json!({ "type": u.r#type, "principalId": u.principal_id }),
        );
    }
    Value::Object(out)
}

/// The event Lambda sends for a batch.
pub fn lambda_event(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}
