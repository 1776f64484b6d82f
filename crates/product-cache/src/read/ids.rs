//! [`BatchIds`]: the ids of a batch request (`GET /products?ids=ID1,ID2,...`), parsed once at
//! the edge from the raw query string.
//!
//! The raw string, not API Gateway's `queryStringParameters`: there an id holding a comma, sent
//! as `%2C`, is already decoded and cannot be told from the separator. Each id is
//! percent-decoded on its own after the split. A `+` stays a `+`: ids are not form data, and a
//! product id may hold one (a space is `%20`).

use std::collections::HashSet;

use crate::id::{InvalidId, KeyType, ProductId};

/// At most this many ids per request: `BatchGetItem`'s limit, so the misses of one request are
/// one table read.
pub const MAX_BATCH_IDS: usize = 100;

/// Why a batch request was refused, before any Redis or DynamoDB call. The caller's mistake: the
/// read path answers 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBatch {
    #[error("expected GET /products?ids=ID1,ID2,... (the `ids` query parameter is missing)")]
    Missing,
    #[error("the `ids` query parameter is given more than once; give every id in one, separated by commas")]
    Repeated,
    #[error("no ids: `ids` is empty")]
    Empty,
    #[error("{0} ids; at most {MAX_BATCH_IDS} per request")]
    TooMany(usize),
    #[error("id {position} is not percent-encoded UTF-8")]
    NotUtf8 { position: usize },
    #[error("id {position} ({id:?}): {source}")]
    Id {
        /// 1-based, as a person counts.
        position: usize,
        id: String,
        source: InvalidId,
    },
}

/// The distinct ids of a batch request in request order (a repeated id keeps its first place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchIds(Vec<ProductId>);

impl BatchIds {
    /// The ids in `query` (a raw query string, without the `?`). Parameters other than `ids`
    /// are ignored (a cache-buster, a tracking tag).
    pub fn parse(query: Option<&str>, key_type: KeyType) -> Result<Self, InvalidBatch> {
        let mut found = None;
        for pair in query.unwrap_or_default().split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_encoding::percent_decode_str(name).decode_utf8_lossy() != "ids" {
                continue;
            }
            if found.replace(value).is_some() {
                return Err(InvalidBatch::Repeated);
            }
        }
        let value = found.ok_or(InvalidBatch::Missing)?;
        if value.is_empty() {
            return Err(InvalidBatch::Empty);
        }
        let raw: Vec<&str> = value.split(',').collect();
        if raw.len() > MAX_BATCH_IDS {
            return Err(InvalidBatch::TooMany(raw.len()));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut ids = Vec::with_capacity(raw.len());
        for (i, encoded) in raw.into_iter().enumerate() {
            let position = i + 1;
            let id = percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_err(|_| InvalidBatch::NotUtf8 { position })?;
            let id = ProductId::parse(&id, key_type).map_err(|source| InvalidBatch::Id {
                position,
                id: id.chars().take(64).collect(),
                source,
            })?;
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        Ok(Self(ids))
    }

    /// Ids already parsed (`pcache warm` reads a file of them), repeats collapsed to their
    /// first place. More than [`MAX_BATCH_IDS`] distinct ids is the caller's mistake.
    pub fn new(ids: impl IntoIterator<Item = ProductId>) -> Result<Self, InvalidBatch> {
        let mut seen = HashSet::new();
        let ids: Vec<ProductId> = ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        match ids.len() {
            0 => Err(InvalidBatch::Empty),
            n if n > MAX_BATCH_IDS => Err(InvalidBatch::TooMany(n)),
            _ => Ok(Self(ids)),
        }
    }

    pub fn as_slice(&self) -> &[ProductId] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for parsed ids; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(query: &str) -> Result<Vec<String>, InvalidBatch> {
        BatchIds::parse(Some(query), KeyType::S)
            .map(|b| b.as_slice().iter().map(|i| i.as_str().to_owned()).collect())
    }

    #[test]
    fn ids_split_on_commas_then_decode_one_by_one() {
        assert_eq!(ids("ids=a,b,c").unwrap(), ["a", "b", "c"]);
        // `%2C` is a comma inside an id, not a separator.
        assert_eq!(ids("ids=a%2Cb,c").unwrap(), ["a,b", "c"]);
        assert_eq!(
            ids("ids=caf%C3%A9,a%20b,a+b").unwrap(),
            ["café", "a b", "a+b"]
        );
        // Other parameters are ignored; the name may be encoded too.
        assert_eq!(ids("v=2&%69ds=x&utm=y").unwrap(), ["x"]);
    }

    #[test]
    fn repeats_collapse_to_their_first_place() {
        assert_eq!(ids("ids=b,a,b,c,a").unwrap(), ["b", "a", "c"]);
        assert_eq!(ids("ids=a,%61").unwrap(), ["a"]);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert_eq!(ids(""), Err(InvalidBatch::Missing));
        assert_eq!(
            BatchIds::parse(None, KeyType::S),
            Err(InvalidBatch::Missing)
        );
        assert_eq!(ids("id=a"), Err(InvalidBatch::Missing));
        assert_eq!(ids("ids=a&ids=b"), Err(InvalidBatch::Repeated));
        assert_eq!(ids("ids="), Err(InvalidBatch::Empty));
        assert_eq!(ids("ids"), Err(InvalidBatch::Empty));
        let many = (0..=MAX_BATCH_IDS)
            .map(|i| i.to_string())
            .collect::<Vec<_>>();
        assert_eq!(
            ids(&format!("ids={}", many.join(","))),
            Err(InvalidBatch::TooMany(101))
        );
        assert_eq!(
            ids(&format!("ids={}", many[..100].join(",")))
                .unwrap()
                .len(),
            100
        );
        assert_eq!(ids("ids=a,%FF"), Err(InvalidBatch::NotUtf8 { position: 2 }));
        let e = ids("ids=a,,b").unwrap_err();
        assert!(
            matches!(
                &e,
                InvalidBatch::Id {
                    position: 2,
                    source: InvalidId::Empty,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = ids("ids=a,%7Bx%7D").unwrap_err();
        assert_eq!(
            e.to_string(),
            "id 2 (\"{x}\"): the product id contains `{` or `}`, which are reserved for cache key hash tags"
        );
        assert!(matches!(
            ids("ids=a,"),
            Err(InvalidBatch::Id { position: 2, .. })
        ));
    }

    #[test]
    fn parsed_ids_make_a_batch_too() {
        let id = |s: &str| ProductId::parse(s, KeyType::S).unwrap();
        let batch = BatchIds::new([id("b"), id("a"), id("b")]).unwrap();
        assert_eq!(batch.as_slice(), [id("b"), id("a")]);
        assert_eq!(BatchIds::new([]), Err(InvalidBatch::Empty));
        let many = (0..=MAX_BATCH_IDS).map(|i| id(&i.to_string()));
        assert_eq!(BatchIds::new(many), Err(InvalidBatch::TooMany(101)));
    }

    #[test]
    fn number_keys_must_be_canonical() {
        assert_eq!(
            BatchIds::parse(Some("ids=42,-1.5"), KeyType::N)
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            BatchIds::parse(Some("ids=42,042"), KeyType::N),
            Err(InvalidBatch::Id {
                position: 2,
                source: InvalidId::NotCanonicalNumber,
                ..
            })
        ));
    }
}
