//! The Extensions API: registration during init, and the extensions' `next` long poll.

use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::oneshot;

use super::reply::{body_json, reply, Reply};
use super::{Event, Extension, State};

pub(super) const EXTENSION_ID: &str = "lambda-extension-identifier";

/// `POST /extension/register`: `{"events": [...]}` with the `Lambda-Extension-Name` header;
/// answers with the extension's identifier in a header and the function in the body.
pub(super) async fn register(state: &State, req: Request<Incoming>) -> Reply {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(name) = header("lambda-extension-name") else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"errorType": "InvalidRequest", "errorMessage": "Lambda-Extension-Name is missing"}),
        );
    };
    let with_account = header("lambda-extension-accept-feature")
        .is_some_and(|f| f.split(',').any(|f| f.trim() == "accountId"));
    let body = body_json(req).await;
    let Some(events) = body["events"].as_array() else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"errorType": "InvalidRequest", "errorMessage": "events is missing"}),
        );
    };
    let invoke = events.iter().any(|e| e == "INVOKE");
    let n = state.ids.fetch_add(1, Ordering::SeqCst);
    let id = format!("c3a6f7e0-1b2d-4e5f-8a9b-{n:012x}");
    {
        let mut lifecycle = state.lifecycle.lock().unwrap();
        // Lambda accepts registrations during init only.
        if lifecycle.invoked {
            return reply(
                StatusCode::FORBIDDEN,
                json!({"errorType": "Extension.RegistrationAfterInit", "errorMessage": name}),
            );
        }
        lifecycle.extensions.push(Extension {
            id: id.clone(),
            name: name.clone(),
            invoke,
            waiting: None,
        });
        state.log(&mut lifecycle, Event::Registered { name });
    }
    let mut function = json!({
        "functionName": state.function_name,
        "functionVersion": "$LATEST",
        "handler": "bootstrap",
    });
    if with_account {
        function["accountId"] = json!("123456789012");
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header(EXTENSION_ID, id)
        .body(Full::new(Bytes::from(function.to_string())))
        .unwrap()
}

/// `GET /extension/event/next`: waits for the next `INVOKE` (an extension registered for no
/// events waits for ever, as it would for a `SHUTDOWN` this server never sends).
pub(super) async fn extension_next(state: &State, req: Request<Incoming>) -> Reply {
    let id = req
        .headers()
        .get(EXTENSION_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (tx, rx) = oneshot::channel();
    {
        let mut lifecycle = state.lifecycle.lock().unwrap();
        let fault = lifecycle.extension_fault;
        let Some(extension) = lifecycle.extensions.iter_mut().find(|e| e.id == id) else {
            return reply(
                StatusCode::FORBIDDEN,
                json!({"errorType": "Extension.UnknownExtensionIdentifier", "errorMessage": id}),
            );
        };
        if fault {
            return extension_fault();
        }
        extension.waiting = Some(tx);
        let name = extension.name.clone();
        state.log(&mut lifecycle, Event::ExtensionNext { name });
    }
    state.waiting.notify_one();
    let Ok(event) = rx.await else {
        if state.lifecycle.lock().unwrap().extension_fault {
            return extension_fault();
        }
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"errorMessage": "superseded by another next"}),
        );
    };
    let event_id = event["requestId"].as_str().unwrap_or_default().to_owned();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("lambda-extension-event-identifier", event_id)
        .body(Full::new(Bytes::from(event.to_string())))
        .unwrap()
}

/// The answer to an extension's `next` once [`RuntimeApi::fail_extension_next`] was called.
fn extension_fault() -> Reply {
    reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"errorType": "Extension.Fault", "errorMessage": "fault injected by the test"}),
    )
}
