//! The read function's Lambda runtime: each response goes out before its fill, and an internal
//! extension keeps Lambda from freezing the execution environment before the fill has landed.
//!
//! Lambda freezes an environment as soon as the runtime and every registered extension have
//! asked for their next event, and the runtime asks as soon as it has posted the response. Work
//! the handler merely spawned would be frozen wherever it stood, its command unsent or its reply
//! unread, for minutes or for good, while other readers wait on the lease it holds. An
//! extension is one more party Lambda waits for: this one, registered for `INVOKE` events in the
//! function's own process, asks for its next event only once the invocation's after-work is
//! done. Lambda hands the response to the caller as soon as the runtime posts it; the time the
//! extension holds the invocation is billed, as `PostRuntimeExtensionsDuration`.
//!
//! Three parties, one hand-over per invocation:
//! - the handler answers with [`answer_request`] and leaves the [`AfterAnswer`] here, under the
//!   invocation's request id;
//! - a layer around all the runtime does for an invocation takes it once the response has been
//!   posted and hands it to the extension. It runs for every invocation, also one that never
//!   reached the handler (an event that is not an HTTP request, a panic), so the extension is
//!   never left waiting for work that will not come;
//! - the extension runs it, then asks for its next event.
//!
//! Without an Extensions API (registration fails), [`run`] logs a warning and serves with
//! [`handle_request`], which runs the fill before the response: slower misses, no lost fill.
//!
//! If the extension's loop ends once registered (its `event/next` fails), [`run`] logs an
//! error and returns [`ExtensionStopped`], and the function's `main` exits with it: a process
//! that served on would have every later invocation held by Lambda until its timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use lambda_http::lambda_runtime::{layers::TracingLayer, LambdaInvocation, Runtime};
use lambda_http::tower::{Layer, Service};
use lambda_http::{service_fn, Adapter, Body, Error, Request, RequestExt as _, Response};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::event::RawQueryGuard;
use super::http::{answer_request, handle_request};
use super::{AfterAnswer, ReadPath};
use crate::cache::Cache;
use crate::store::ProductStore;

/// The extension's name in the Extensions API (unique within the function).
pub const EXTENSION_NAME: &str = "product-cache-fill";

/// Serves the read function until the runtime stops: with the extension when it can be
/// registered, else (one warning) with the fill before each response. Call it during init: an
/// extension must register before the runtime first asks for an event. Returns
/// [`ExtensionStopped`] if the extension's loop ends: the caller must then exit, non-zero.
pub async fn run<C: Cache, S: ProductStore>(read: &ReadPath<C, S>) -> Result<(), Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    // A tokio Mutex: the extension holds the receiver across the await of each after-work.
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let registered = lambda_extension::Extension::new()
        .with_extension_name(EXTENSION_NAME)
        // The only event an extension inside the function's process may register for.
        .with_events(&["INVOKE"])
        .with_events_processor(lambda_extension::service_fn(
            move |event: lambda_extension::LambdaEvent| {
                let rx = rx.clone();
                async move {
                    if let lambda_extension::NextEvent::Invoke(invoke) = event.next {
                        finish(&mut *rx.lock().await, &invoke.request_id).await;
                    }
                    Ok::<(), Error>(())
                }
            },
        ))
        .register()
        .await;
    let extension = match registered {
        Ok(extension) => extension,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no Lambda Extensions API; each miss fills the cache before it answers"
            );
            let handler = Adapter::from(service_fn(|req| handle_request(read, req)));
            return lambda_http::lambda_runtime::run(RawQueryGuard(handler)).await;
        }
    };
    let deferral = Arc::new(Deferral {
        waiting: Mutex::default(),
        hand_to: HandTo::Extension(tx),
    });
    tokio::select! {
        biased;
        served = serve(read, deferral) => served,
        stopped = extension.run() => Err(stopped_extension(stopped).into()),
    }
}

/// The fill extension's loop ended (its `event/next` failed, or its events ran out): the
/// process must end too. Lambda still counts the extension as registered and waits for its next
/// `next` before it settles an invocation, so serving on would hold every later invocation
/// until the function's timeout. Once the process has exited, Lambda starts a fresh execution
/// environment for the next event instead.
#[derive(Debug, thiserror::Error)]
#[error("the fill extension stopped; exiting so that Lambda starts a fresh execution environment")]
pub struct ExtensionStopped(#[source] pub Option<Error>);

fn stopped_extension(stopped: Result<(), Error>) -> ExtensionStopped {
    let stopped = ExtensionStopped(stopped.err());
    match &stopped.0 {
        Some(e) => tracing::error!(error = %e, "{stopped}"),
        None => tracing::error!("{stopped}"),
    }
    stopped
}

/// [`run`] with every after-work spawned and nothing holding the invocation, as a handler
/// that just spawns its fill would: what the extension prevents, for the tests that show it.
#[cfg(feature = "test-support")]
pub async fn run_unguarded<C: Cache, S: ProductStore>(read: &ReadPath<C, S>) -> Result<(), Error> {
    let deferral = Arc::new(Deferral {
        waiting: Mutex::default(),
        hand_to: HandTo::Spawn,
    });
    serve(read, deferral).await
}

/// Runs the after-work handed over up to and including `request_id`'s. Earlier ones are not
/// expected (one hand-over per invocation, in order) but are run rather than dropped.
async fn finish(rx: &mut mpsc::UnboundedReceiver<HandOver>, request_id: &str) {
    while let Some(HandOver {
        request_id: id,
        after,
    }) = rx.recv().await
    {
        after.await;
        if id == request_id {
            return;
        }
        tracing::warn!(
            handed_over = id,
            invocation = request_id,
            "after-work of another invocation"
        );
    }
    // The runtime is gone: nothing more will come.
}

async fn serve<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    deferral: Arc<Deferral>,
) -> Result<(), Error> {
    let handler = {
        let deferral = deferral.clone();
        service_fn(move |req| {
            let deferral = deferral.clone();
            async move { Ok::<_, Infallible>(deferral.respond(read, req).await) }
        })
    };
    // A layer runs before the layers added earlier: tracing outermost, as `lambda_http::run`
    // has it; the hand-over around the response's post.
    Runtime::new(RawQueryGuard(Adapter::from(handler)))
        .layer(AfterResponseLayer(deferral))
        .layer(TracingLayer::new())
        .run()
        .await
}

/// The after-work of one invocation, on its way to the extension.
struct HandOver {
    request_id: String,
    after: AfterAnswer,
}

enum HandTo {
    Extension(mpsc::UnboundedSender<HandOver>),
    /// Spawned, held by nothing.
    #[cfg(feature = "test-support")]
    Spawn,
}

/// Shared by the handler, which leaves each invocation's after-work here, and the layer, which
/// takes it once the response is out.
struct Deferral {
    // A std Mutex: never held across an await.
    waiting: Mutex<HashMap<String, AfterAnswer>>,
    hand_to: HandTo,
}

impl Deferral {
    async fn respond<C: Cache, S: ProductStore>(
        &self,
        read: &ReadPath<C, S>,
        req: Request,
    ) -> Response<Body> {
        let request_id = req.lambda_context_ref().map(|c| c.request_id.clone());
        let (response, after) = answer_request(read, req).await;
        // The extension runs it outside the runtime's span for this invocation: carry the span
        // along, so that a failed fill's warning still names its request id.
        let after = AfterAnswer::run(after.into_future().instrument(tracing::Span::current()));
        match request_id {
            Some(id) => {
                self.waiting.lock().unwrap().insert(id, after);
            }
            // Not from the runtime (no invocation to attach it to): run it now.
            None => after.await,
        }
        response
    }

    /// Called once per invocation, after the runtime has posted its response (or error).
    fn hand_over(&self, request_id: String) {
        let after = self
            .waiting
            .lock()
            .unwrap()
            .remove(&request_id)
            .unwrap_or_else(AfterAnswer::nothing);
        match &self.hand_to {
            HandTo::Extension(tx) => {
                if let Err(mpsc::error::SendError(h)) = tx.send(HandOver { request_id, after }) {
                    // The extension has stopped and `run` is returning: running the work unheld
                    // beats dropping it in the moment before the process exits.
                    tokio::spawn(h.after.into_future());
                }
            }
            #[cfg(feature = "test-support")]
            HandTo::Spawn => {
                tokio::spawn(after.into_future());
            }
        }
    }
}

/// Wraps everything the runtime does for one invocation, the response's post included.
struct AfterResponseLayer(Arc<Deferral>);

impl<S> Layer<S> for AfterResponseLayer {
    type Service = AfterResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AfterResponse {
            inner,
            deferral: self.0.clone(),
        }
    }
}

struct AfterResponse<S> {
    inner: S,
    deferral: Arc<Deferral>,
}

impl<S> Service<LambdaInvocation> for AfterResponse<S>
where
    S: Service<LambdaInvocation, Response = ()>,
{
    type Response = ();
    type Error = S::Error;
    type Future = Posted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let request_id = invocation.context.request_id.clone();
        Posted {
            inner: Box::pin(self.inner.call(invocation)),
            hand_over: Some((self.deferral.clone(), request_id)),
        }
    }
}

/// The invocation's future; once it is done (the response posted), hands the after-work over.
struct Posted<F> {
    // Boxed so that this future is Unpin without a projection crate; one box per invocation.
    inner: Pin<Box<F>>,
    hand_over: Option<(Arc<Deferral>, String)>,
}

impl<F: Future> Future for Posted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let posted = ready!(self.inner.as_mut().poll(cx));
        if let Some((deferral, request_id)) = self.hand_over.take() {
            deferral.hand_over(request_id);
        }
        Poll::Ready(posted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn flag_work(flag: &Arc<AtomicBool>) -> AfterAnswer {
        let flag = flag.clone();
        AfterAnswer::run(async move { flag.store(true, Ordering::SeqCst) })
    }

    fn held() -> (Deferral, mpsc::UnboundedReceiver<HandOver>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let deferral = Deferral {
            waiting: Mutex::default(),
            hand_to: HandTo::Extension(tx),
        };
        (deferral, rx)
    }

    #[tokio::test]
    async fn every_invocation_hands_over_once_with_or_without_work() {
        let (deferral, mut rx) = held();
        let ran = Arc::new(AtomicBool::new(false));
        deferral
            .waiting
            .lock()
            .unwrap()
            .insert("a".into(), flag_work(&ran));
        deferral.hand_over("a".into());
        // "b" never reached the handler (say, not an HTTP event): still one hand-over.
        deferral.hand_over("b".into());

        finish(&mut rx, "a").await;
        assert!(ran.load(Ordering::SeqCst), "a's work ran before its next");
        let b = rx.try_recv().expect("b was handed over");
        assert_eq!(b.request_id, "b");
        assert!(!b.after.is_pending());
        assert!(rx.try_recv().is_err(), "one hand-over per invocation");
        assert!(deferral.waiting.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_extension_runs_earlier_work_it_missed_and_stops_at_its_own() {
        let (deferral, mut rx) = held();
        let (first, second): (Arc<AtomicBool>, Arc<AtomicBool>) = Default::default();
        for (id, flag) in [("1", &first), ("2", &second)] {
            deferral
                .waiting
                .lock()
                .unwrap()
                .insert(id.into(), flag_work(flag));
            deferral.hand_over(id.into());
        }
        finish(&mut rx, "2").await;
        assert!(first.load(Ordering::SeqCst) && second.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn without_the_extension_the_work_still_runs() {
        let (deferral, rx) = held();
        drop(rx);
        let ran = Arc::new(AtomicBool::new(false));
        deferral
            .waiting
            .lock()
            .unwrap()
            .insert("a".into(), flag_work(&ran));
        deferral.hand_over("a".into());
        for _ in 0..100 {
            if ran.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the spawned work never ran");
    }
}
