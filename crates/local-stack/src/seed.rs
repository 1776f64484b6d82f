//! The sample catalog a fresh local table starts with, and the price change the walk-through
//! makes to it.
//!
//! The catalog is deterministic (the same ids, names and prices on every machine), so the
//! commands printed at start-up and the tests can name products: `kb-001` is always the
//! "Mechanical keyboard" at 129.99.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, ReturnValue, WriteRequest};

/// How many products a fresh table is seeded with.
pub const DEFAULT_PRODUCTS: usize = 1000;

/// DynamoDB's limit on requests in one `BatchWriteItem`.
const BATCH: usize = 25;
/// Batches in flight at once while seeding. Enough to hide round trips; few enough not to make
/// the local emulator return everything as unprocessed.
const SEED_CONCURRENCY: usize = 4;
/// Attempts at one batch before seeding gives up on throttling.
const BATCH_ATTEMPTS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("DynamoDB {operation} on table {table} failed")]
    Dynamo {
        operation: &'static str,
        table: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("table {table}: {unprocessed} items were still unprocessed after {BATCH_ATTEMPTS} BatchWriteItem attempts")]
    Unprocessed { table: String, unprocessed: usize },
    #[error("no product {id} in table {table}")]
    NoSuchProduct { id: String, table: String },
    #[error("{0:?} is not a price: expected a non-negative decimal number such as 99.99")]
    InvalidPrice(String),
}

/// One product of the sample catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: &'static str,
    /// As DynamoDB stores it: canonical decimal digits, no trailing zeros.
    pub price: String,
    pub stock: u32,
    pub tags: Vec<String>,
}

struct Category {
    prefix: &'static str,
    name: &'static str,
    kinds: &'static [&'static str],
    /// Price range in whole currency units.
    price: (u64, u64),
}

const CATEGORIES: &[Category] = &[
    Category {
        prefix: "kb",
        name: "keyboards",
        kinds: &[
            "Mechanical keyboard",
            "Low-profile keyboard",
            "Split keyboard",
            "Compact keyboard",
        ],
        price: (29, 249),
    },
    Category {
        prefix: "mouse",
        name: "mice",
        kinds: &[
            "Wireless mouse",
            "Gaming mouse",
            "Vertical mouse",
            "Trackball",
        ],
        price: (9, 149),
    },
    Category {
        prefix: "mon",
        name: "monitors",
        kinds: &[
            "27\" monitor",
            "32\" 4K monitor",
            "Ultrawide monitor",
            "Portable monitor",
        ],
        price: (119, 1299),
    },
    Category {
        prefix: "hs",
        name: "headsets",
        kinds: &[
            "USB headset",
            "Wireless headset",
            "Noise-cancelling headphones",
            "Earbuds",
        ],
        price: (19, 399),
    },
    Category {
        prefix: "cam",
        name: "webcams",
        kinds: &["1080p webcam", "4K webcam", "Conference camera"],
        price: (29, 299),
    },
    Category {
        prefix: "dock",
        name: "docks",
        kinds: &["USB-C dock", "Thunderbolt dock", "USB hub"],
        price: (19, 349),
    },
    Category {
        prefix: "ssd",
        name: "storage",
        kinds: &["NVMe SSD", "Portable SSD", "SATA SSD", "USB flash drive"],
        price: (9, 499),
    },
    Category {
        prefix: "cbl",
        name: "cables",
        kinds: &[
            "USB-C cable",
            "HDMI cable",
            "DisplayPort cable",
            "Ethernet cable",
        ],
        price: (4, 49),
    },
    Category {
        prefix: "mic",
        name: "microphones",
        kinds: &["USB microphone", "XLR microphone", "Lavalier microphone"],
        price: (19, 349),
    },
    Category {
        prefix: "desk",
        name: "furniture",
        kinds: &["Standing desk", "Monitor arm", "Desk mat", "Footrest"],
        price: (14, 799),
    },
];

const SERIES: &[&str] = &[
    "", "Pro ", "Lite ", "Max ", "Plus ", "Air ", "Studio ", "Mini ",
];
const TAGS: &[&str] = &[
    "bestseller",
    "new",
    "sale",
    "wireless",
    "usb-c",
    "refurbished",
    "eco",
    "bundle",
];
/// Cents that end in 9, so no price has a trailing zero DynamoDB would normalise away.
const CENTS: &[u64] = &[99, 49, 29, 79, 19, 59, 89, 39];

/// SplitMix64: a stateless mix of the product's index, so every product's attributes are fixed
/// without a random number generator to seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first `n` products of the catalog, categories interleaved: `kb-001`, `mouse-001`, ...,
/// `desk-001`, `kb-002`, ...
pub fn catalog(n: usize) -> Vec<Product> {
    (0..n).map(product).collect()
}

fn product(index: usize) -> Product {
    let category = &CATEGORIES[index % CATEGORIES.len()];
    let number = index / CATEGORIES.len() + 1;
    let id = format!("{}-{number:03}", category.prefix);
    if index == 0 {
        // The product the walk-through changes: its name and price are part of the docs.
        return Product {
            id,
            name: "Mechanical keyboard".into(),
            category: category.name,
            price: "129.99".into(),
            stock: 42,
            tags: vec![category.name.into(), "bestseller".into()],
        };
    }
    let h = mix(index as u64);
    let kind = category.kinds[(h % category.kinds.len() as u64) as usize];
    let series = SERIES[((h >> 8) % SERIES.len() as u64) as usize];
    let (low, high) = category.price;
    let whole = low + (h >> 16) % (high - low + 1);
    let cents = CENTS[((h >> 32) % CENTS.len() as u64) as usize];
    let mut tags = vec![category.name.to_owned()];
    for (bit, tag) in TAGS.iter().enumerate() {
        // About one tag in four.
        if (h >> (40 + 2 * bit)) & 3 == 0 {
            tags.push((*tag).to_owned());
        }
    }
    Product {
        id,
        name: format!("{series}{kind}"),
        category: category.name,
        price: format!("{whole}.{cents}"),
        stock: ((h >> 56) % 250) as u32,
        tags,
    }
}

impl Product {
    /// The item as written to the table, keyed by `key_attribute`.
    pub fn item(&self, key_attribute: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (key_attribute.to_owned(), AttributeValue::S(self.id.clone())),
            ("name".into(), AttributeValue::S(self.name.clone())),
            ("category".into(), AttributeValue::S(self.category.into())),
            ("price".into(), AttributeValue::N(self.price.clone())),
            ("stock".into(), AttributeValue::N(self.stock.to_string())),
            ("tags".into(), AttributeValue::Ss(self.tags.clone())),
            // Every write increments it, so VERSION_ATTRIBUTE=version orders the cache by it.
            ("version".into(), AttributeValue::N("1".into())),
        ])
    }
}

fn dynamo_error<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
    table: &str,
) -> impl FnOnce(E) -> SeedError {
    let table = table.to_owned();
    move |e| SeedError::Dynamo {
        operation,
        table,
        source: Box::new(e),
    }
}

/// Whether the table has no items at all (one `Scan` of at most one item).
pub async fn is_empty(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<bool, SeedError> {
    let out = client
        .scan()
        .table_name(table)
        .limit(1)
        .send()
        .await
        .map_err(dynamo_error("Scan", table))?;
    Ok(out.count == 0 && out.last_evaluated_key.is_none())
}

/// Writes the first `n` catalog products if the table is empty, and returns how many were
/// written (0 when the table already had items: a restart must not undo someone's changes).
pub async fn seed_if_empty(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key_attribute: &str,
    n: usize,
) -> Result<usize, SeedError> {
    if n == 0 || !is_empty(client, table).await? {
        return Ok(0);
    }
    let items: Vec<_> = catalog(n).iter().map(|p| p.item(key_attribute)).collect();
    batch_write(client, table, items).await?;
    Ok(n)
}

/// Puts `items` with `BatchWriteItem`, 25 per call, a few calls in flight, resending what a
/// call returns as `UnprocessedItems` with exponential backoff (DynamoDB's documented answer to
/// throttling).
pub async fn batch_write(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    items: Vec<HashMap<String, AttributeValue>>,
) -> Result<(), SeedError> {
    use futures::stream::{StreamExt as _, TryStreamExt as _};

    let mut batches = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let batch: Result<Vec<WriteRequest>, SeedError> = items
            .by_ref()
            .take(BATCH)
            .map(|item| {
                let put = PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map_err(dynamo_error("BatchWriteItem", table))?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect();
        batches.push(batch?);
    }
    futures::stream::iter(batches)
        .map(|batch| write_one_batch(client, table, batch))
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<()>()
        .await
}

async fn write_one_batch(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    mut requests: Vec<WriteRequest>,
) -> Result<(), SeedError> {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=BATCH_ATTEMPTS {
        let out = client
            .batch_write_item()
            .request_items(table, requests)
            .send()
            .await
            .map_err(dynamo_error("BatchWriteItem", table))?;
        requests = out
            .unprocessed_items
            .and_then(|mut m| m.remove(table))
            .unwrap_or_default();
        if requests.is_empty() {
            return Ok(());
        }
        if attempt < BATCH_ATTEMPTS {
            tracing::debug!(
                unprocessed = requests.len(),
                attempt,
                "BatchWriteItem left items unprocessed; retrying"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    Err(SeedError::Unprocessed {
        table: table.to_owned(),
        unprocessed: requests.len(),
    })
}

/// A changed price: the item's price before and after, and its new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceChange {
    pub id: String,
    pub old_price: Option<String>,
    pub new_price: String,
    pub version: Option<String>,
}

impl std::fmt::Display for PriceChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: price {} -> {}",
            self.id,
            self.old_price.as_deref().unwrap_or("(none)"),
            self.new_price
        )?;
        if let Some(v) = &self.version {
            write!(f, " (version {v})")?;
        }
        Ok(())
    }
}

/// Sets an existing product's price and increments its `version`, as any writer to the table
/// would; the stream then carries the change to the cache. Never creates an item.
pub async fn set_price(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key_attribute: &str,
    id: &str,
    price: &str,
) -> Result<PriceChange, SeedError> {
    if !is_price(price) {
        return Err(SeedError::InvalidPrice(price.to_owned()));
    }
    let result = client
        .update_item()
        .table_name(table)
        .key(key_attribute, AttributeValue::S(id.to_owned()))
        .update_expression("SET #price = :price ADD #version :one")
        .condition_expression("attribute_exists(#key)")
        .expression_attribute_names("#price", "price")
        .expression_attribute_names("#version", "version")
        .expression_attribute_names("#key", key_attribute)
        .expression_attribute_values(":price", AttributeValue::N(price.to_owned()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .return_values(ReturnValue::UpdatedOld)
        .send()
        .await;
    let old = match result {
        Ok(out) => out.attributes.unwrap_or_default(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
        {
            return Err(SeedError::NoSuchProduct {
                id: id.to_owned(),
                table: table.to_owned(),
            })
        }
        Err(e) => return Err(dynamo_error("UpdateItem", table)(e)),
    };
    let number = |name: &str| old.get(name).and_then(|v| v.as_n().ok()).cloned();
    // ADD starts a missing attribute from 0.
    let version = match number("version") {
        None => Some(1),
        Some(v) => v.parse::<u128>().ok().map(|v| v + 1),
    };
    Ok(PriceChange {
        id: id.to_owned(),
        old_price: number("price"),
        new_price: price.to_owned(),
        version: version.map(|v| v.to_string()),
    })
}

/// Digits with at most one decimal point, not starting or ending with it.
fn is_price(s: &str) -> bool {
    let mut parts = s.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && parts.next().is_none_or(digits) && s.len() <= 38
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_is_deterministic_and_starts_with_the_documented_keyboard() {
        let a = catalog(DEFAULT_PRODUCTS);
        assert_eq!(a, catalog(DEFAULT_PRODUCTS));
        assert_eq!(a.len(), 1000);
        assert_eq!(a[0].id, "kb-001");
        assert_eq!(a[0].name, "Mechanical keyboard");
        assert_eq!(a[0].price, "129.99");
        assert_eq!(a[1].id, "mouse-001");
        assert_eq!(a[999].id, "desk-100");
        let ids: std::collections::HashSet<_> = a.iter().map(|p| &p.id).collect();
        assert_eq!(ids.len(), a.len(), "ids are unique");
        for p in &a {
            assert!(is_price(&p.price), "{p:?}");
            assert!(!p.price.ends_with('0'), "not canonical: {p:?}");
            assert!(!p.tags.is_empty(), "DynamoDB rejects an empty set: {p:?}");
        }
    }

    #[test]
    fn items_carry_every_documented_attribute() {
        let item = catalog(1)[0].item("productId");
        assert_eq!(item["productId"], AttributeValue::S("kb-001".into()));
        assert_eq!(item["price"], AttributeValue::N("129.99".into()));
        assert_eq!(item["version"], AttributeValue::N("1".into()));
        for attr in ["name", "category", "stock", "tags"] {
            assert!(item.contains_key(attr), "{attr}");
        }
    }

    #[test]
    fn prices_are_plain_decimals() {
        for ok in ["0", "99.99", "1299", "0.5"] {
            assert!(is_price(ok), "{ok}");
        }
        for bad in ["", "-1", "1e3", "9.", ".9", "1.2.3", "abc", " 1"] {
            assert!(!is_price(bad), "{bad}");
        }
    }
}
