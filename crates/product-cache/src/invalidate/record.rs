//! Reading a stream record's fields in place: the lookups planning and rendering share, and
//! what a record says about itself (its sequence number, whether TTL removed its item).

use serde_json::Value;

/// `value[name]` for the small objects of a stream record (see [`field_of`]).
pub(super) fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    field_of(value.as_object()?, name)
}

/// `map[name]`, found by scanning the entries for one of the same length first. serde_json's
/// map is a B-tree of `String`s: a lookup compares the name with several keys, each compare a
/// read of a separate heap allocation, and over a 10,000-record batch those cache misses were
/// most of the cost of planning. A record's objects have a handful of entries whose lengths
/// (kept in the tree's nodes) mostly differ, so the scan reads one key's bytes, usually the
/// right one. A large object (an image) is looked up the usual way.
pub(super) fn field_of<'v>(
    map: &'v serde_json::Map<String, Value>,
    name: &str,
) -> Option<&'v Value> {
    if map.len() > 16 {
        return map.get(name);
    }
    map.iter()
        .find(|(k, _)| k.len() == name.len() && k.as_str() == name)
        .map(|(_, v)| v)
}

pub(super) fn sequence_number_of(record: &Value) -> Option<String> {
    record
        .pointer("/dynamodb/SequenceNumber")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A REMOVE made by DynamoDB's TTL process rather than by a user (`userIdentity` of type
/// `Service`, principal `dynamodb.amazonaws.com`).
pub fn is_ttl_expiry(record: &Value) -> bool {
    let identity = record.get("userIdentity");
    let field = |name| identity.and_then(|i| i.get(name)).and_then(Value::as_str);
    field("type") == Some("Service") && field("principalId") == Some("dynamodb.amazonaws.com")
}
