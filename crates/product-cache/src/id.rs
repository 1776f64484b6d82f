//! [`ProductId`]: a product id parsed once at the edge, so nothing behind it can see an id that
//! breaks the key scheme or that DynamoDB would reject.

use std::fmt;

/// DynamoDB type of the table's partition key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    S,
    N,
}

impl std::str::FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "S" | "s" => Ok(Self::S),
            "N" | "n" => Ok(Self::N),
            other => Err(format!("expected `S` or `N`, got `{other}`")),
        }
    }
}

/// Why an id was refused. These are the caller's mistakes: the read path answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("the product id is empty")]
    Empty,
    #[error("the product id is {0} bytes long; the limit is {MAX_ID_BYTES}")]
    TooLong(usize),
    #[error("the product id contains a control character")]
    ControlCharacter,
    #[error("the product id contains `{{` or `}}`, which are reserved for cache key hash tags")]
    Brace,
    #[error("the product id must be a number in canonical form (e.g. `42` or `-1.5`, no leading zeros, exponent or trailing zeros)")]
    NotCanonicalNumber,
}

/// DynamoDB's limit on a partition key value.
pub const MAX_ID_BYTES: usize = 2048;
/// DynamoDB numbers carry at most 38 significant digits.
const MAX_NUMBER_DIGITS: usize = 38;

/// The id of a product, valid as a DynamoDB key of the configured type and as part of a Redis key.
/// Shared, not copied, when cloned: a batch answer names each of its up to 100 products, and on
/// a 2-core machine allocation was most of a batch hit's own work.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProductId(std::sync::Arc<str>);

impl ProductId {
    pub fn parse(raw: &str, key_type: KeyType) -> Result<Self, InvalidId> {
        Self::check(raw, key_type)?;
        Ok(Self(raw.into()))
    }

    /// The cache key of the id `raw`, if it is one: what [`parse`](Self::parse) then
    /// [`cache_key`](Self::cache_key) give, in one allocation instead of two (the invalidator
    /// does this for every record of a batch).
    pub fn cache_key_of(raw: &str, key_type: KeyType, prefix: &str) -> Result<String, InvalidId> {
        Self::check(raw, key_type)?;
        Ok(key_of(prefix, raw))
    }

    fn check(raw: &str, key_type: KeyType) -> Result<(), InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId::Empty);
        }
        if raw.len() > MAX_ID_BYTES {
            return Err(InvalidId::TooLong(raw.len()));
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidId::ControlCharacter);
        }
        if raw.contains(['{', '}']) {
            return Err(InvalidId::Brace);
        }
        // DynamoDB normalises numbers (`042` is stored and streamed as `42`), so a non-canonical
        // spelling would be cached under a key that no stream record ever invalidates.
        if key_type == KeyType::N && !is_canonical_number(raw) {
            return Err(InvalidId::NotCanonicalNumber);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Redis key holding this product's document.
    pub fn cache_key(&self, prefix: &str) -> String {
        key_of(prefix, &self.0)
    }
}

/// `prefix` + `id`, in one allocation (a batch makes up to 100 of them per request).
fn key_of(prefix: &str, id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + id.len());
    key.push_str(prefix);
    key.push_str(id);
    key
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?`, not `-0`, at most 38 significant digits.
fn is_canonical_number(s: &str) -> bool {
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (int.len() > 1 && int.starts_with('0')) {
        return false;
    }
    if let Some(f) = frac {
        if !digits(f) || f.ends_with('0') {
            return false;
        }
    }
    if s.starts_with('-') && int == "0" && frac.is_none() {
        return false;
    }
    let significant = format!("{int}{}", frac.unwrap_or(""));
    significant.trim_start_matches('0').len() <= MAX_NUMBER_DIGITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for id in ["kb-001", "Ünïcode ✓", "a/b", "x".repeat(2048).as_str()] {
            assert_eq!(ProductId::parse(id, KeyType::S).unwrap().as_str(), id);
        }
        for id in ["0", "42", "-7", "129.99", "0.5", "-0.001"] {
            assert!(ProductId::parse(id, KeyType::N).is_ok(), "{id}");
        }
    }

    #[test]
    fn refuses_what_would_break_keys_or_dynamodb() {
        use InvalidId::*;
        let cases = [
            ("", KeyType::S, Empty),
            (&"x".repeat(2049), KeyType::S, TooLong(2049)),
            ("kb\n001", KeyType::S, ControlCharacter),
            ("kb\u{7f}", KeyType::S, ControlCharacter),
            ("{kb}", KeyType::S, Brace),
            ("kb}", KeyType::S, Brace),
            ("042", KeyType::N, NotCanonicalNumber),
            ("4.20", KeyType::N, NotCanonicalNumber),
            ("1e3", KeyType::N, NotCanonicalNumber),
            ("-0", KeyType::N, NotCanonicalNumber),
            ("abc", KeyType::N, NotCanonicalNumber),
            (".5", KeyType::N, NotCanonicalNumber),
            ("5.", KeyType::N, NotCanonicalNumber),
            (&"9".repeat(39), KeyType::N, NotCanonicalNumber),
        ];
        for (raw, kt, want) in cases {
            assert_eq!(ProductId::parse(raw, kt), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn cache_key_is_prefix_plus_id() {
        let id = ProductId::parse("kb-001", KeyType::S).unwrap();
        assert_eq!(id.cache_key("product:"), "product:kb-001");
    }
}
