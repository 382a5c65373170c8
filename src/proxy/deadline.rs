//! A response body that ends at a deadline.
//!
//! `proxy.request_timeout_ms` bounds the whole exchange, and a response
//! streams back after its head: a Klavi that sends the head and then
//! trickles (or stalls) its body would otherwise hold the app's request,
//! and a connection slot, for ever. tower-http's `TimeoutBody` bounds the
//! time between frames, not the total, so this is the one body written
//! here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The deadline passed while the body was still streaming.
#[derive(Debug, thiserror::Error)]
#[error("the response body did not finish within proxy.request_timeout_ms")]
pub struct DeadlinePassed;

/// `inner`, cut off with [`DeadlinePassed`] at the deadline.
#[derive(Debug)]
pub struct DeadlineBody<B> {
    inner: Pin<Box<B>>,
    sleep: Pin<Box<Sleep>>,
    /// The profile to name in a warning when the body fails.
    profile: Option<Arc<str>>,
}

impl<B> DeadlineBody<B> {
    /// `inner`, until `deadline`.
    pub fn new(inner: B, deadline: Instant) -> Self {
        Self {
            inner: Box::pin(inner),
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            profile: None,
        }
    }

    /// Logs a warning naming `profile` when the body fails or is cut off:
    /// the access line was written at the head, with its status, and
    /// would not say the app got a truncated answer.
    pub fn on_error(mut self, profile: Arc<str>) -> Self {
        self.profile = Some(profile);
        self
    }

    fn warn(&self, error: &dyn std::fmt::Display) {
        if let Some(profile) = &self.profile {
            tracing::warn!(
                profile = %profile,
                %error,
                "a proxied response was cut off before its end; the app got it truncated"
            );
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = self.inner.as_mut().poll_frame(cx) {
            return Poll::Ready(frame.map(|f| {
                f.map_err(|error| {
                    let error: Self::Error = error.into();
                    self.warn(&error);
                    error
                })
            }));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.warn(&DeadlinePassed);
                Poll::Ready(Some(Err(Box::new(DeadlinePassed))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::channel::Channel;
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_passed_whole() {
        let body = DeadlineBody::new(
            Full::new(Bytes::from_static(b"abc")),
            Instant::now() + Duration::from_secs(1),
        );
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok(), Some(Bytes::from_static(b"abc")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_cut_at_the_deadline() {
        let (mut tx, channel) = Channel::<Bytes, std::io::Error>::new(4);
        let started = Instant::now();
        let mut body = DeadlineBody::new(channel, started + Duration::from_secs(2));
        tx.send_data(Bytes::from_static(b"head")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"head"));
        // The sender stays open and sends nothing more.
        let next = body.frame().await.unwrap();
        assert!(next.unwrap_err().is::<DeadlinePassed>());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        drop(tx);
    }
}
