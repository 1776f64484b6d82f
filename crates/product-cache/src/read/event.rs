//! The API Gateway event before `lambda_http` reads it: a raw query string made safe to parse.
//!
//! API Gateway passes `rawQueryString` on as the client sent it, and `lambda_http` appends it to
//! the request's URI and panics (`failed to build request`) when it holds a byte a URI may not:
//! a space, `"`, `<`, `>` (`curl 'https://.../products?ids=a"b'` sends the quote as is). The
//! runtime catches the panic and API Gateway answers a bare 500, where such a request deserves
//! the read path's own 400 or answer. So those bytes are percent-encoded first, as a browser
//! would have sent them: an id decoded from the query is the same either way.

use std::future::{ready, Ready};
use std::task::{Context, Poll};

use futures::future::{Either, MapErr, TryFutureExt as _};
use lambda_http::lambda_runtime::LambdaEvent;
use lambda_http::request::LambdaRequest;
use lambda_http::tower::Service;
use lambda_http::Error;

/// Wraps the service `lambda_http` builds around a handler ([`lambda_http::Adapter`]): takes the
/// event as JSON, encodes its raw query string (see the module's doc), then hands it on.
pub(crate) struct RawQueryGuard<S>(pub S);

type Boxed<E> = fn(E) -> Error;

impl<S> Service<LambdaEvent<serde_json::Value>> for RawQueryGuard<S>
where
    S: Service<LambdaEvent<LambdaRequest>>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Either<MapErr<S::Future, Boxed<S::Error>>, Ready<Result<S::Response, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, event: LambdaEvent<serde_json::Value>) -> Self::Future {
        let LambdaEvent {
            mut payload,
            context,
        } = event;
        if let Some(query) = payload.get_mut("rawQueryString") {
            if let Some(raw) = query.as_str() {
                *query = encode_unsafe(raw).into();
            }
        }
        match serde_json::from_value::<LambdaRequest>(payload) {
            Ok(request) => Either::Left(
                self.0
                    .call(LambdaEvent::new(request, context))
                    .map_err(Into::into as Boxed<S::Error>),
            ),
            // Not an HTTP event: reported as the runtime reports an event it cannot read.
            Err(e) => Either::Right(ready(Err(format!(
                "failed to deserialize the incoming data into the function's payload type \
                 (an HTTP request): {e}"
            )
            .into()))),
        }
    }
}

/// `raw` with the bytes a URI's query may not hold percent-encoded (controls, space, `"`,
/// `#`, `<`, `>`, DEL); everything else, `%` escapes included, as it was.
fn encode_unsafe(raw: &str) -> String {
    let unsafe_byte = |b: u8| b <= b' ' || b == 0x7f || matches!(b, b'"' | b'#' | b'<' | b'>');
    if !raw.bytes().any(unsafe_byte) {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len() + 8);
    for c in raw.chars() {
        if c.is_ascii() && unsafe_byte(c as u8) {
            out.push_str(&format!("%{:02X}", c as u8));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(raw_query: &str) -> serde_json::Value {
        let mut event: serde_json::Value = serde_json::from_str(include_str!(
            "../../../../tests/fixtures/apigw-get-product.json"
        ))
        .unwrap();
        event["rawQueryString"] = raw_query.into();
        event
    }

    #[test]
    fn what_lambda_http_cannot_parse_is_encoded_and_the_rest_kept() {
        for (raw, safe) in [
            ("ids=a\"b,c d", "ids=a%22b,c%20d"),
            ("ids=<a>#b", "ids=%3Ca%3E%23b"),
            ("ids=a%2Cb,caf%C3%A9,é,{x}|y", "ids=a%2Cb,caf%C3%A9,é,{x}|y"),
        ] {
            assert_eq!(encode_unsafe(raw), safe);
            let mut payload = event(raw);
            payload["rawQueryString"] = encode_unsafe(raw).into();
            let request: LambdaRequest = serde_json::from_value(payload).unwrap();
            let request: lambda_http::Request = request.into();
            assert_eq!(request.uri().query(), Some(safe));
        }
    }

    #[tokio::test]
    async fn a_query_lambda_http_would_panic_on_reaches_the_handler() {
        let handler = lambda_http::service_fn(|req: lambda_http::Request| async move {
            Ok::<_, std::convert::Infallible>(req.uri().query().unwrap_or_default().to_owned())
        });
        let mut guarded = RawQueryGuard(lambda_http::Adapter::from(handler));
        let context = lambda_http::lambda_runtime::Context::default();
        let answer = guarded
            .call(LambdaEvent::new(event("ids=a\"b"), context.clone()))
            .await
            .unwrap();
        let answer = serde_json::to_value(answer).unwrap();
        assert_eq!(answer["body"], "ids=a%22b", "{answer}");
        // Unguarded, lambda_http panics while building the request.
        let unguarded = std::panic::catch_unwind(|| {
            let request: LambdaRequest = serde_json::from_value(event("ids=a\"b")).unwrap();
            let _: lambda_http::Request = request.into();
        });
        assert!(
            unguarded.is_err(),
            "lambda_http no longer panics: the guard may go"
        );
        // Not an HTTP event: an error, not a panic.
        let not_http = guarded
            .call(LambdaEvent::new(
                serde_json::json!({"Records": []}),
                context,
            ))
            .await;
        let error = not_http
            .expect_err("a non-HTTP event is an error")
            .to_string();
        assert!(error.contains("deserialize"), "{error}");
    }
}
