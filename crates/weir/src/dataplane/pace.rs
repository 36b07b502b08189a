//! Backpressure from an HTTP/1.1 client's socket to the upstream: while the client's
//! kernel takes no more of a response, its body is not polled, so the upstream
//! connection (driven by that body, see `client.rs`) is not read either and the
//! upstream's own sends block.
//!
//! Why on top of hyper's: hyper's HTTP/1 server keeps polling a response body until its
//! write buffer holds `max_buf_size` bytes (the same setting as the request-head limit,
//! 64 KiB by default) plus one more chunk, whether or not the socket takes anything. A
//! thousand clients that read slowly then cost that much each. Gated on the socket, a
//! slow reader costs the unsent rest of one chunk.
//!
//! HTTP/2 is not gated: its bodies are polled from stream tasks, and h2's flow control
//! with the server's `max_send_buf_size` bounds what one stream buffers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 server: the window a client stream starts with (hyper's default is 1 MiB, so
/// one stream could fill the connection's window alone).
pub(crate) const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 server: the connection's window, the most a client may send ahead of weir
/// reading it (hyper's default, made explicit).
pub(crate) const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 server: what one stream's response may queue beyond what the client's window
/// lets out (hyper's default is 400 KiB).
pub(crate) const H2_SEND_BUF_BYTES: usize = 64 * 1024;

/// Whether a connection's last write found the socket full. Set and cleared by
/// [`GatedIo`], read by [`Paced`] bodies of the same connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteGate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    blocked: AtomicBool,
    /// The body waiting for the gate to open. For HTTP/1.1 it is the connection's own
    /// task, which the socket wakes anyway; kept so that a gated body is never left
    /// without a wake-up whoever polls it.
    waker: Mutex<Option<Waker>>,
}

impl WriteGate {
    /// Ready when the socket took the last write; otherwise wakes `cx` once it does.
    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.blocked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *self.0.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // The socket may have drained between the check and the registration.
        if self.0.blocked.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn record<T>(&self, write: &Poll<io::Result<T>>) {
        if write.is_pending() {
            self.0.blocked.store(true, Ordering::Release);
        } else if self.0.blocked.swap(false, Ordering::AcqRel) {
            let waker = self
                .0
                .waker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// A client connection's stream, recording in its [`WriteGate`] whether writes block.
#[derive(Debug)]
pub(crate) struct GatedIo<T> {
    inner: T,
    gate: WriteGate,
}

impl<T> GatedIo<T> {
    pub(crate) fn new(inner: T, gate: WriteGate) -> Self {
        GatedIo { inner, gate }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GatedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GatedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.gate.record(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.gate.record(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that waits while its connection's socket is full (when it has a
/// gate: HTTP/1.1 responses), before it polls the body it wraps.
#[derive(Debug)]
pub(crate) struct Paced<B> {
    inner: B,
    gate: Option<WriteGate>,
}

impl<B> Paced<B> {
    pub(crate) fn new(inner: B, gate: Option<WriteGate>) -> Self {
        Paced { inner, gate }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Paced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(gate) = &this.gate {
            std::task::ready!(gate.poll_open(cx));
        }
        Pin::new(&mut this.inner).poll_frame(cx)
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
    use super::*;
    use http_body_util::Full;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_blocked_write_holds_the_body_until_a_write_goes_through() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let gate = WriteGate::default();
        let mut body = Paced::new(Full::new(Bytes::from_static(b"x")), Some(gate.clone()));

        gate.record(&Poll::<io::Result<usize>>::Pending);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);

        gate.record(&Poll::Ready(Ok(1usize)));
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the waiting body is woken"
        );
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_data().unwrap(), "x"),
            other => panic!("expected the data frame, got {other:?}"),
        }
    }

    #[test]
    fn an_ungated_body_is_polled_whatever_the_socket_does() {
        let waker = Waker::from(Arc::new(CountWakes(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let mut body = Paced::new(Full::new(Bytes::from_static(b"x")), None);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_ready());
    }
}
