//! The Runtime API's invocation routes: the runtime's `next` long poll and its answers.

use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::json;
use tokio::sync::oneshot;

use super::reply::{accepted, reply, Reply};
use super::{Event, InvocationTiming, Outcome, State};

/// `POST /runtime/invocation/{id}/response` or `/error`: the caller gets it at once.
pub(super) fn answered(state: &State, id: String, outcome: Outcome) -> Reply {
    let answered = Instant::now();
    let mut lifecycle = state.lifecycle.lock().unwrap();
    let Some((waiter, delivered)) = lifecycle.in_flight.remove(&id) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"errorType": "InvalidRequestID", "errorMessage": id}),
        );
    };
    let timing = InvocationTiming {
        delivered,
        answered,
        settled: None,
    };
    lifecycle.timings.push((id.clone(), timing));
    state.log(&mut lifecycle, Event::Answered { request_id: id });
    // The caller may have given up waiting; that is its own failure.
    let _ = waiter.send(outcome);
    accepted()
}

/// `GET /runtime/invocation/next`: waits until an event is handed out.
pub(super) async fn runtime_next(state: &State) -> Reply {
    let (tx, rx) = oneshot::channel();
    {
        let mut lifecycle = state.lifecycle.lock().unwrap();
        let polled = Instant::now();
        lifecycle.first_poll.get_or_insert(polled);
        lifecycle.next_polls += 1;
        state.polls_seen.send_replace(lifecycle.next_polls);
        lifecycle.runtime = Some(tx);
        state.log(&mut lifecycle, Event::RuntimeNext);
    }
    state.waiting.notify_one();
    let Ok(delivery) = rx.await else {
        // Another poll took this one's place.
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"errorMessage": "superseded by another next"}),
        );
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("lambda-runtime-aws-request-id", delivery.request_id)
        .header(
            "lambda-runtime-deadline-ms",
            delivery.deadline_ms.to_string(),
        )
        .header(
            "lambda-runtime-invoked-function-arn",
            state.function_arn.as_str(),
        )
        .header("lambda-runtime-trace-id", delivery.trace_id)
        .body(Full::new(Bytes::from(delivery.event.to_string())))
        .unwrap()
}
