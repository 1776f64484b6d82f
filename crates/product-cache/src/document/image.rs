//! A stream image's DynamoDB JSON (`{"tags":{"SS":["a","b"]}}`) seen as attributes in place,
//! accepting exactly what `serde_dynamo` reads as an item (tested against it): each value an
//! object with one key naming its type, `N` and `S` strings, `BOOL` and `NULL` booleans, `B`
//! padded standard base64, `M` an object, `L` an array, sets arrays of those.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::Value;

use super::{Attribute, View};

/// The attributes of an image, or `None` if it is not an object.
pub(super) fn entries(image: &Value) -> Option<Vec<(&str, &Value)>> {
    let map = image.as_object()?;
    Some(map.iter().map(|(k, v)| (k.as_str(), v)).collect())
}

impl Attribute for Value {
    fn view(&self) -> Result<View<'_, Self>, &'static str> {
        let mut fields = self
            .as_object()
            .ok_or("a value is an object naming its type")?
            .iter();
        let (Some((kind, inner)), None) = (fields.next(), fields.next()) else {
            return Err("a value is an object with exactly one key");
        };
        Ok(match kind.as_str() {
            "S" => View::S(string(inner)?),
            "N" => View::N(string(inner)?),
            "BOOL" => View::Bool(inner.as_bool().ok_or("`BOOL` holds a boolean")?),
            "NULL" => {
                inner.as_bool().ok_or("`NULL` holds a boolean")?;
                View::Null
            }
            "B" => View::B(Cow::Owned(base64(string(inner)?)?)),
            "M" => View::M(entries(inner).ok_or("`M` holds an object")?),
            "L" => View::L(inner.as_array().ok_or("`L` holds an array")?),
            "SS" => View::Ss(strings(inner)?),
            "NS" => View::Ns(strings(inner)?),
            "BS" => View::Bs(
                strings(inner)?
                    .into_iter()
                    .map(|s| base64(s).map(Cow::Owned))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err("a value's key is one of DynamoDB's types"),
        })
    }

    fn size_hint(&self) -> usize {
        // `{"S": "..."}`: the string's own length; anything else counts a little.
        match self.as_object().and_then(|m| m.values().next()) {
            Some(Value::String(s)) => s.len() + 2,
            _ => 16,
        }
    }
}

fn string(v: &Value) -> Result<&str, &'static str> {
    v.as_str().ok_or("`N`, `S` and `B` hold strings")
}

fn strings(v: &Value) -> Result<Vec<&str>, &'static str> {
    v.as_array()
        .ok_or("a set holds an array")?
        .iter()
        .map(|s| s.as_str().ok_or("a set's members are strings"))
        .collect()
}

fn base64(s: &str) -> Result<Vec<u8>, &'static str> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| "binary values are padded standard base64")
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;
    use serde_json::json;

    use crate::document::Document;

    /// The document the read path makes of the item `serde_dynamo` reads from `image`, or
    /// `None` where either step fails.
    fn through_item(image: &Value) -> Option<Document> {
        let item = serde_dynamo::Item::deserialize(image).ok()?;
        Document::from_item(&item).ok()
    }

    use super::*;

    #[test]
    fn an_image_gives_the_bytes_of_the_same_item_read_from_the_table() {
        let image = json!({
            "productId": {"S": "kb-001"},
            "s": {"S": "a \"quoted\"\nline ✓ \u{1}"},
            "price": {"N": "129.99"},
            "hundred": {"N": "1E+2"},
            "negzero": {"N": "-0.0"},
            "big": {"N": "12345678901234567890123456789012345678"},
            "bigneg": {"N": "-99999999999999999999999999999999999999"},
            "tiny": {"N": "1e-130"},
            "odd": {"N": "+007.50"},
            "t": {"BOOL": true},
            "f": {"BOOL": false},
            "nothing": {"NULL": true},
            "bin": {"B": "aGVsbG8="},
            "empty_bin": {"B": ""},
            "m": {"M": {
                "z": {"N": "1"},
                "a": {"L": [{"S": "x"}, {"N": "2"}, {"M": {}}, {"L": []}, {"NULL": true}]},
                "nested": {"M": {"deeper": {"SS": ["b", "a"]}}}
            }},
            "ss": {"SS": ["b", "a", "é"]},
            "ns": {"NS": ["10", "2.5", "1", "-1E+2", "12345678901234567890123456789012345678"]},
            // Sorted by their bytes (0xfb and 0xff last), not by their base64 text.
            "bs": {"BS": ["d29ybGQ=", "aGVsbG8=", "/w==", "+w=="]},
        });
        let doc = Document::from_image(&image).unwrap();
        assert_eq!(Some(&doc), through_item(&image).as_ref());
        assert_eq!(
            doc.as_str(),
            r#"{"big":12345678901234567890123456789012345678,"bigneg":-99999999999999999999999999999999999999,"bin":"aGVsbG8=","bs":["aGVsbG8=","d29ybGQ=","+w==","/w=="],"empty_bin":"","f":false,"hundred":1E+2,"m":{"a":["x",2,{},[],null],"nested":{"deeper":["a","b"]},"z":1},"negzero":-0.0,"nothing":null,"ns":[-1E+2,1,2.5,10,12345678901234567890123456789012345678],"odd":7.50,"price":129.99,"productId":"kb-001","s":"a \"quoted\"\nline ✓ \u0001","ss":["a","b","é"],"t":true,"tiny":1E-130}"#
        );
    }

    #[test]
    fn what_serde_dynamo_rejects_is_rejected() {
        let bad = [
            json!("not an object"),
            json!([]),
            json!({"a": "plain"}),
            json!({"a": {}}),
            json!({"a": {"S": "x", "N": "1"}}),
            json!({"a": {"X": "1"}}),
            json!({"a": {"s": "lower case"}}),
            json!({"a": {"S": 1}}),
            json!({"a": {"N": 9.99}}),
            json!({"a": {"N": "abc"}}),
            json!({"a": {"BOOL": "true"}}),
            json!({"a": {"NULL": null}}),
            json!({"a": {"B": "not base64!"}}),
            json!({"a": {"B": "YR=="}}),
            json!({"a": {"B": "YQ"}}),
            json!({"a": {"M": []}}),
            json!({"a": {"L": {}}}),
            json!({"a": {"L": [{"S": "ok"}, "bare"]}}),
            json!({"a": {"SS": [1]}}),
            json!({"a": {"SS": "a"}}),
            json!({"a": {"NS": ["1", "x"]}}),
            json!({"a": {"BS": ["aGVsbG8=", "%%"]}}),
            json!({"a": {"M": {"b": {"M": {"c": {"N": {}}}}}}}),
        ];
        for image in bad {
            assert_eq!(through_item(&image), None, "{image}");
            assert!(Document::from_image(&image).is_err(), "{image}");
        }
        let err = Document::from_image(&json!({"m": {"M": {"l": {"L": [{"N": "1"}, {"N": 2}]}}}}))
            .unwrap_err();
        assert_eq!(err.path, "m.l[1]");
    }

    /// A random attribute of depth at most `depth`, now and then malformed.
    fn attribute(rng: &mut fastrand::Rng, depth: u32) -> Value {
        let text = |rng: &mut fastrand::Rng| -> String {
            (0..rng.usize(0..20))
                .map(|_| match rng.u8(0..8) {
                    0 => char::from(rng.u8(0..0x20)),
                    1 => ['"', '\\', 'é', '😀', '\u{7f}'][rng.usize(0..5)],
                    _ => char::from(rng.u8(0x20..0x7f)),
                })
                .collect()
        };
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "-0.0",
            "1E+2",
            "1e-130",
            "9.99",
            "+7",
            "007",
            ".5",
            "5.",
            " 12 ",
            "12345678901234567890123456789012345678",
            "-1.5E-7",
            "1.000",
            "abc",
            "1e",
            "",
        ];
        let number = |rng: &mut fastrand::Rng| NUMBERS[rng.usize(..NUMBERS.len())];
        let bytes = |rng: &mut fastrand::Rng| -> String {
            if rng.u8(0..20) == 0 {
                return ["YQ", "YR==", "!!"][rng.usize(0..3)].to_owned();
            }
            let b: Vec<u8> = (0..rng.usize(0..12)).map(|_| rng.u8(..)).collect();
            base64::engine::general_purpose::STANDARD.encode(b)
        };
        let nested = depth > 0;
        match rng.u8(0..if nested { 11 } else { 8 }) {
            0 => json!({"S": text(rng)}),
            1 => json!({"N": number(rng)}),
            2 => json!({"BOOL": rng.bool()}),
            3 => json!({"NULL": rng.bool()}),
            4 => json!({"B": bytes(rng)}),
            5 => json!({"SS": (0..rng.usize(0..4)).map(|_| text(rng)).collect::<Vec<_>>()}),
            6 => json!({"NS": (0..rng.usize(0..4)).map(|_| number(rng)).collect::<Vec<_>>()}),
            7 => json!({"BS": (0..rng.usize(0..4)).map(|_| bytes(rng)).collect::<Vec<_>>()}),
            8 => json!({"M": map(rng, depth - 1)}),
            9 => {
                json!({"L": (0..rng.usize(0..4)).map(|_| attribute(rng, depth - 1)).collect::<Vec<_>>()})
            }
            _ => [
                json!({}),
                json!({"S": 1}),
                json!({"S": "a", "N": "1"}),
                json!({"Q": "1"}),
                json!("bare"),
            ][rng.usize(0..5)]
            .clone(),
        }
    }

    fn map(rng: &mut fastrand::Rng, depth: u32) -> Value {
        let keys = ["a", "b", "Z", "é", "a.b", "", "price", "x\"y", "10", "9"];
        Value::Object(
            (0..rng.usize(0..6))
                .map(|_| {
                    (
                        keys[rng.usize(..keys.len())].to_owned(),
                        attribute(rng, depth),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn random_images_give_the_same_bytes_or_fail_on_both_paths() {
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..20_000 {
            let image = map(&mut rng, 3);
            let want = through_item(&image);
            let got = Document::from_image(&image).ok();
            assert_eq!(got, want, "{image}");
            if want.is_some() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        // Both outcomes are exercised, not just one.
        assert!(
            ok > 5_000 && failed > 1_000,
            "{ok} built, {failed} rejected"
        );
    }
}
