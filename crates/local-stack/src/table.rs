//! The local table: AWS SDK configuration for a local endpoint, and creating the table with its
//! stream the way the SAM template does.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType as SdkKeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType,
};
use product_cache::id::KeyType;

/// A failed DynamoDB call while setting up the table.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation} on table {table} failed")]
pub struct TableError {
    pub operation: &'static str,
    pub table: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// SDK configuration for a local DynamoDB (and DynamoDB Streams) at `endpoint`. Credentials are
/// placeholders: local emulators accept any, and real ones must never be needed locally.
pub async fn local_sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "local",
            "local",
            None,
            None,
            "local-stack",
        ))
        .load()
        .await
}

/// Creates `table` keyed by `key_attribute` with a `NEW_AND_OLD_IMAGES` stream unless it exists,
/// and returns the stream's ARN.
pub async fn ensure_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key_attribute: &str,
    key_type: KeyType,
) -> Result<String, TableError> {
    ensure_table_with_stream(
        client,
        table,
        key_attribute,
        key_type,
        StreamViewType::NewAndOldImages,
    )
    .await
}

/// [`ensure_table`] with a stream of `view` (`KEYS_ONLY`, `NEW_IMAGE`, ...), for what the
/// functions make of a table whose stream carries less than the template's. A table that
/// exists keeps the stream it has.
pub async fn ensure_table_with_stream(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key_attribute: &str,
    key_type: KeyType,
    view: StreamViewType,
) -> Result<String, TableError> {
    let err = |operation: &'static str| {
        let table = table.to_owned();
        move |e: Box<dyn std::error::Error + Send + Sync>| TableError {
            operation,
            table,
            source: e,
        }
    };
    let exists = client.describe_table().table_name(table).send().await;
    if exists.is_err() {
        let attr_type = match key_type {
            KeyType::S => ScalarAttributeType::S,
            KeyType::N => ScalarAttributeType::N,
        };
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(key_attribute)
                    .attribute_type(attr_type)
                    .build()
                    .map_err(|e| err("CreateTable")(e.into()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(key_attribute)
                    .key_type(SdkKeyType::Hash)
                    .build()
                    .map_err(|e| err("CreateTable")(e.into()))?,
            )
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(view)
                    .build()
                    .map_err(|e| err("CreateTable")(e.into()))?,
            )
            .send()
            .await;
        // Another process may have created it between the two calls; DescribeTable below tells.
        if let Err(e) = created {
            tracing::debug!(error = %e, table, "CreateTable failed; checking whether it exists");
        }
    }
    let desc = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| err("DescribeTable")(e.into()))?;
    desc.table
        .and_then(|t| t.latest_stream_arn)
        .ok_or_else(|| err("DescribeTable")("the table has no stream enabled".into()))
}
