//! The one body type that flows through the proxy: boxed, streaming, never collected unless a
//! stage needs the bytes.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Streams a body from hyper (client upload or upstream download) without buffering it.
pub fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// How far a streamed upload has got; each of its frames is a change too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    Sending,
    Done,
    /// The client's body broke off (a client gone away mid-upload, say).
    Failed,
}

pub type Progress = tokio::sync::watch::Receiver<Upload>;

/// A streamed body that reports its progress: the response timeout counts from an upload's last
/// frame (see `forward::after_upload`).
pub fn watched(body: Body) -> (Body, Progress) {
    let (tx, rx) = tokio::sync::watch::channel(Upload::Sending);
    let watched = Watched {
        inner: body,
        progress: Some(tx),
    };
    (watched.boxed_unsync(), rx)
}

struct Watched {
    inner: Body,
    progress: Option<tokio::sync::watch::Sender<Upload>>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let frame = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(p) = &this.progress {
                    p.send_replace(Upload::Sending);
                }
            }
            Poll::Ready(end) => {
                if let Some(p) = this.progress.take() {
                    let failed = matches!(end, Some(Err(_)));
                    p.send_replace(if failed { Upload::Failed } else { Upload::Done });
                }
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A whole response with a content type: the admin endpoints' and the fakes' answers.
pub fn respond(
    status: http::StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> http::Response<Body> {
    let mut r = http::Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}
