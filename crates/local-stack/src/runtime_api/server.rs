//! The HTTP server: a connection per function client, each request routed to the Runtime API
//! or the Extensions API.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::extensions::{extension_next, register};
use super::reply::{accepted, body_json, reply, Reply};
use super::runtime::{answered, runtime_next};
use super::State;

const RUNTIME: &str = "/2018-06-01/runtime";
const EXTENSION: &str = "/2020-01-01/extension";

pub(super) async fn serve(listener: TcpListener, state: Arc<State>) {
    // Owned here so that aborting the server task also drops every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| route(state.clone(), req));
            // A function killed in the middle of a long poll just closes its connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_owned();
    let not_found = || reply(StatusCode::NOT_FOUND, json!({"errorMessage": path}));
    if let Some(rest) = path.strip_prefix(EXTENSION) {
        if !state.options.extensions_api {
            return Ok(not_found());
        }
        return Ok(match (req.method().clone(), rest) {
            (Method::POST, "/register") => register(&state, req).await,
            (Method::GET, "/event/next") => extension_next(&state, req).await,
            (Method::POST, "/init/error" | "/exit/error") => {
                let body = body_json(req).await;
                tracing::warn!(%body, "an extension reported an error");
                accepted()
            }
            _ => not_found(),
        });
    }
    let Some(rest) = path.strip_prefix(RUNTIME) else {
        return Ok(not_found());
    };
    let method = req.method().clone();
    Ok(match (method, rest) {
        (Method::GET, "/invocation/next") => runtime_next(&state).await,
        (Method::POST, "/init/error") => {
            let body = body_json(req).await;
            state.lifecycle.lock().unwrap().init_error = Some(body);
            accepted()
        }
        (Method::POST, rest) => {
            let answer = rest.strip_prefix("/invocation/").and_then(|r| {
                r.strip_suffix("/response")
                    .map(|id| (id, true))
                    .or_else(|| r.strip_suffix("/error").map(|id| (id, false)))
            });
            match answer {
                Some((id, ok)) => {
                    let id = id.to_owned();
                    let body = body_json(req).await;
                    answered(&state, id, if ok { Ok(body) } else { Err(body) })
                }
                None => not_found(),
            }
        }
        _ => not_found(),
    })
}
