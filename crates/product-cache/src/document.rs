//! The one mapping from a DynamoDB item to the JSON document stored in the cache.
//!
//! Both paths (the read path's fill and the invalidator's refresh) call [`Document::from_item`], so
//! the bytes in Redis are the same whichever path wrote them. The mapping is written by hand
//! because the generic route (`serde_dynamo` into `serde_json::Value`) rounds 38-digit numbers to
//! floats and fails on binary attributes:
//!
//! | DynamoDB | JSON |
//! |---|---|
//! | `S` | string |
//! | `N` | number, with the stored digits verbatim (`129.99` stays `129.99`) |
//! | `BOOL` | `true` / `false` |
//! | `NULL` | `null` |
//! | `M` | object, keys sorted |
//! | `L` | array, in order |
//! | `SS`, `NS`, `BS` | array, sorted (sets have no order; sorting makes the bytes stable) |
//! | `B`, `BS` members | base64 string (standard alphabet, padded) |

use std::collections::HashMap;

use base64::Engine as _;
use serde_dynamo::AttributeValue;

/// A product serialised as compact JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document(String);

/// An attribute that has no JSON form. Only a number DynamoDB itself would reject gets here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attribute `{path}` holds {value:?}, which is not a number")]
pub struct DocumentError {
    pub path: String,
    pub value: String,
}

impl Document {
    /// Builds the document of an item given as `serde_dynamo` attributes (stream images, and
    /// SDK items through `serde_dynamo::Item::from`).
    pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Self, DocumentError> {
        let mut out = String::with_capacity(256);
        write_map(&mut out, item, "")?;
        Ok(Self(out))
    }

    /// Wraps bytes read back from the cache. The cache holds only documents this module wrote,
    /// so they are not parsed again on the hot path.
    pub fn from_cached(json: String) -> Self {
        Self(json)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn write_map(
    out: &mut String,
    map: &HashMap<String, AttributeValue>,
    path: &str,
) -> Result<(), DocumentError> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        write_value(out, v, &join(path, k))?;
    }
    out.push('}');
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn write_value(out: &mut String, v: &AttributeValue, path: &str) -> Result<(), DocumentError> {
    match v {
        AttributeValue::S(s) => write_str(out, s),
        AttributeValue::N(n) => write_number(out, n, path)?,
        AttributeValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        AttributeValue::Null(_) => out.push_str("null"),
        AttributeValue::B(b) => write_bytes(out, b),
        AttributeValue::M(m) => write_map(out, m, path)?,
        AttributeValue::L(l) => {
            out.push('[');
            for (i, v) in l.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, v, &format!("{path}[{i}]"))?;
            }
            out.push(']');
        }
        AttributeValue::Ss(ss) => {
            let mut ss: Vec<&String> = ss.iter().collect();
            ss.sort_unstable();
            write_array(out, ss, |out, s| {
                write_str(out, s);
                Ok(())
            })?;
        }
        AttributeValue::Ns(ns) => {
            let mut ns: Vec<(f64, &String)> = ns
                .iter()
                .map(|n| (n.trim().parse::<f64>().unwrap_or(f64::NAN), n))
                .collect();
            // Numeric order reads naturally; the string breaks ties between numbers that differ
            // only beyond f64 precision, so the order is total and the same on both paths.
            ns.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
            write_array(out, ns, |out, (_, n)| write_number(out, n, path))?;
        }
        AttributeValue::Bs(bs) => {
            let mut bs: Vec<&Vec<u8>> = bs.iter().collect();
            bs.sort_unstable();
            write_array(out, bs, |out, b| {
                write_bytes(out, b);
                Ok(())
            })?;
        }
    }
    Ok(())
}

fn write_array<T>(
    out: &mut String,
    items: Vec<T>,
    mut each: impl FnMut(&mut String, T) -> Result<(), DocumentError>,
) -> Result<(), DocumentError> {
    out.push('[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        each(out, item)?;
    }
    out.push(']');
    Ok(())
}

fn write_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; serialising a &str cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a string always serialises"));
}

fn write_bytes(out: &mut String, b: &[u8]) {
    out.push('"');
    base64::engine::general_purpose::STANDARD.encode_string(b, out);
    out.push('"');
}

fn write_number(out: &mut String, n: &str, path: &str) -> Result<(), DocumentError> {
    let err = || DocumentError {
        path: path.to_owned(),
        value: n.to_owned(),
    };
    let json = json_number(n.trim()).ok_or_else(err)?;
    out.push_str(&json);
    Ok(())
}

/// The JSON spelling of a DynamoDB number, keeping every digit. DynamoDB answers numbers in
/// JSON-compatible form, but it accepts `+1`, `.5`, `5.` and `007` on input, and stream
/// emulators may echo them back, so those are rewritten rather than stored as broken JSON.
fn json_number(n: &str) -> Option<String> {
    let (sign, rest) = match n.as_bytes().first()? {
        b'-' => ("-", &n[1..]),
        b'+' => ("", &n[1..]),
        _ => ("", n),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        return None;
    }
    if int.is_empty() && frac.is_none_or(str::is_empty) {
        return None;
    }
    let mut out = String::with_capacity(n.len() + 2);
    out.push_str(sign);
    let int = int.trim_start_matches('0');
    out.push_str(if int.is_empty() { "0" } else { int });
    if let Some(f) = frac.filter(|f| !f.is_empty()) {
        out.push('.');
        out.push_str(f);
    }
    if let Some(e) = exponent {
        let (esign, edigits) = match e.as_bytes().first()? {
            b'-' => ("-", &e[1..]),
            b'+' => ("+", &e[1..]),
            _ => ("", e),
        };
        if edigits.is_empty() || !all_digits(edigits) {
            return None;
        }
        out.push('E');
        out.push_str(esign);
        out.push_str(edigits);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttributeValue as A;

    fn item(pairs: Vec<(&str, AttributeValue)>) -> HashMap<String, AttributeValue> {
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn every_type_maps_as_documented() {
        let doc = Document::from_item(&item(vec![
            ("s", A::S("a \"quoted\"\nline ✓".into())),
            ("price", A::N("129.99".into())),
            ("big", A::N("12345678901234567890123456789012345678".into())),
            ("tiny", A::N("-0.000001".into())),
            ("t", A::Bool(true)),
            ("f", A::Bool(false)),
            ("nothing", A::Null(true)),
            ("bin", A::B(b"hello".to_vec())),
            (
                "m",
                A::M(item(vec![
                    ("z", A::N("1".into())),
                    ("a", A::L(vec![A::S("x".into()), A::N("2".into())])),
                ])),
            ),
            ("ss", A::Ss(vec!["b".into(), "a".into()])),
            ("ns", A::Ns(vec!["10".into(), "2.5".into(), "1".into()])),
            ("bs", A::Bs(vec![b"world".to_vec(), b"hello".to_vec()])),
        ]))
        .unwrap();
        assert_eq!(
            doc.as_str(),
            r#"{"big":12345678901234567890123456789012345678,"bin":"aGVsbG8=","bs":["aGVsbG8=","d29ybGQ="],"f":false,"m":{"a":["x",2],"z":1},"nothing":null,"ns":[1,2.5,10],"price":129.99,"s":"a \"quoted\"\nline ✓","ss":["a","b"],"t":true,"tiny":-0.000001}"#
        );
        // Whatever the mapping, the result must be JSON any client can parse.
        let v: serde_json::Value = serde_json::from_str(doc.as_str()).unwrap();
        assert_eq!(v["ss"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn same_item_in_any_order_gives_the_same_bytes() {
        let a = item(vec![
            ("a", A::N("1".into())),
            ("b", A::Ss(vec!["x".into(), "y".into()])),
        ]);
        let b = item(vec![
            ("b", A::Ss(vec!["y".into(), "x".into()])),
            ("a", A::N("1".into())),
        ]);
        assert_eq!(
            Document::from_item(&a).unwrap(),
            Document::from_item(&b).unwrap()
        );
    }

    #[test]
    fn numbers_keep_their_digits_and_become_valid_json() {
        let cases = [
            ("129.99", "129.99"),
            ("0", "0"),
            ("-0.5", "-0.5"),
            ("1E+125", "1E+125"),
            ("1e-130", "1E-130"),
            ("+7", "7"),
            ("007", "7"),
            (".5", "0.5"),
            ("5.", "5"),
            (
                "99999999999999999999999999999999999999",
                "99999999999999999999999999999999999999",
            ),
        ];
        for (n, want) in cases {
            assert_eq!(json_number(n).as_deref(), Some(want), "{n}");
            serde_json::from_str::<serde_json::Value>(want).unwrap();
        }
        for bad in [
            "", "-", ".", "abc", "1e", "1e+", "1.2.3", "0x10", "NaN", "1 2",
        ] {
            assert_eq!(json_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_broken_number_is_an_error_naming_its_path() {
        let err = Document::from_item(&item(vec![(
            "m",
            A::M(item(vec![("n", A::N("abc".into()))])),
        )]))
        .unwrap_err();
        assert_eq!(err.path, "m.n");
    }
}
