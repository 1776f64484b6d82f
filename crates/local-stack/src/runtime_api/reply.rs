//! The JSON replies every route sends, and the JSON bodies it reads.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

pub(super) type Reply = Response<Full<Bytes>>;

/// A body that is not JSON is kept as a JSON string, so the caller can show it.
pub(super) async fn body_json(req: Request<Incoming>) -> Value {
    let bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return Value::String(format!("<body not read: {e}>")),
    };
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
}

pub(super) fn accepted() -> Reply {
    reply(StatusCode::ACCEPTED, json!({"status": "OK"}))
}

pub(super) fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
