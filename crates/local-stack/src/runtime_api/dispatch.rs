//! The lifecycle: each queued event handed out once the runtime and every extension wait for
//! one, the invocation settled between, and the process frozen and thawed around it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::mpsc;

use super::{Delivery, Event, Queued, State};

/// The deadline announced to the function (`Lambda-Runtime-Deadline-Ms`), from the moment the
/// function picks the event up.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) takes any pid and signal number; a process that is gone gives ESRCH,
    // which is no concern here (its test is over).
    unsafe { libc::kill(pid, sig) };
}

/// Hands out each queued event once everyone waits for one, and settles (and freezes) between.
pub(super) async fn dispatch(mut queued: mpsc::UnboundedReceiver<Queued>, state: Arc<State>) {
    loop {
        // `Notify` keeps a permit for a notification that comes before this wait.
        while !state.lifecycle.lock().unwrap().everyone_waits() {
            state.waiting.notified().await;
        }
        let next = {
            let mut lifecycle = state.lifecycle.lock().unwrap();
            let settled = lifecycle.current.take();
            if settled.is_some() || !lifecycle.init_settled {
                lifecycle.init_settled = true;
                let now = Instant::now();
                if let Some(id) = &settled {
                    if let Some((_, t)) = lifecycle.timings.iter_mut().find(|(i, _)| i == id) {
                        t.settled = Some(now);
                    }
                }
                state.log(
                    &mut lifecycle,
                    Event::Settled {
                        request_id: settled,
                    },
                );
            }
            match queued.try_recv() {
                Ok(next) => Some(next),
                Err(_) => {
                    if let (false, Some(pid)) = (lifecycle.frozen, lifecycle.freeze_pid) {
                        signal(pid, libc::SIGSTOP);
                        lifecycle.frozen = true;
                        state.log(&mut lifecycle, Event::Frozen);
                    }
                    None
                }
            }
        };
        let next = match next {
            Some(next) => next,
            None => match queued.recv().await {
                Some(next) => next,
                None => return,
            },
        };
        // A party may have stopped waiting meanwhile (an extension whose `next` failed): the
        // event is held until it asks again, as Lambda holds it.
        while !state.lifecycle.lock().unwrap().everyone_waits() {
            state.waiting.notified().await;
        }
        hand_out(&state, next);
    }
}

fn hand_out(state: &State, queued: Queued) {
    let n = state.ids.fetch_add(1, Ordering::SeqCst);
    let request_id = format!("8476a536-e9f4-11e8-9739-{n:012x}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let deadline_ms = (now + FUNCTION_TIMEOUT).as_millis();
    let trace_id = format!(
        "Root=1-{:08x}-{n:024x};Parent={n:016x};Sampled=0;Lineage=1:0a1b2c3d:0",
        now.as_secs()
    );
    let mut lifecycle = state.lifecycle.lock().unwrap();
    if lifecycle.frozen {
        if let Some(pid) = lifecycle.freeze_pid {
            signal(pid, libc::SIGCONT);
        }
        lifecycle.frozen = false;
        state.log(&mut lifecycle, Event::Thawed);
    }
    lifecycle.invoked = true;
    lifecycle.current = Some(request_id.clone());
    lifecycle
        .in_flight
        .insert(request_id.clone(), (queued.answer, Instant::now()));
    // As Lambda documents the extension's `INVOKE` event.
    let invoke = json!({
        "eventType": "INVOKE",
        "deadlineMs": deadline_ms as u64,
        "requestId": request_id,
        "invokedFunctionArn": state.function_arn,
        "tracing": {"type": "X-Amzn-Trace-Id", "value": trace_id},
    });
    for extension in lifecycle.extensions.iter_mut().filter(|e| e.invoke) {
        if let Some(waiting) = extension.waiting.take() {
            // An extension that hung up misses the event; it is still counted as not waiting.
            let _ = waiting.send(invoke.clone());
        }
    }
    let runtime = lifecycle.runtime.take().expect("everyone waits");
    // A runtime that hung up leaves the invocation unanswered; `invoke` reports that.
    let _ = runtime.send(Delivery {
        request_id: request_id.clone(),
        event: queued.event,
        deadline_ms,
        trace_id,
    });
    state.log(&mut lifecycle, Event::Delivered { request_id });
}
