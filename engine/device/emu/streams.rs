//! The emulated device's two streams ([`Stream::Compute`], [`Stream::Comm`]): the emulator runs every command at
//! once, in issue order, so it cannot see a missing event by its results; instead it tracks which work of one stream
//! the other has waited for, and refuses a command that touches memory the other stream's unfinished work touches.
//!
//! Each stream counts the accesses issued on it (a node's declared reads and writes, or a copy's, memset's or
//! all-reduce's own footprint); an event remembers the count of the stream it was recorded on; a wait raises the
//! waiting stream's view of the other (a vector clock of two). An access conflicts with an access of the other
//! stream that the waits do not order before it when one writes what the other reads or writes: that is an error
//! naming both. The host's waits finish a stream's work (`download` the compute stream's, `synchronize` both).
//!
//! While capturing, the rules of stream capture across streams are checked too (CUDA Programming Guide, "Stream
//! Capture", "Cross-stream Dependencies and Events", docs.nvidia.com/cuda/cuda-c-programming-guide/
//! #cross-stream-dependencies-and-events): a capture begins on the compute stream; the communication stream joins it
//! only by waiting on an event the compute stream recorded inside the capture (work issued to it before that would
//! run at once, outside the graph); and every fork must be joined back into the origin stream before the capture
//! ends, or `cuStreamEndCapture` fails with `CUDA_ERROR_STREAM_CAPTURE_UNJOINED` ("the capture sequence contains a
//! fork that was not joined to the primary stream").

use crate::engine::device::{EventId, Span, Stream};
use crate::error::{Error, Result};
use std::collections::HashMap;

fn index(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Comm => 1,
    }
}

fn other(s: Stream) -> Stream {
    match s {
        Stream::Compute => Stream::Comm,
        Stream::Comm => Stream::Compute,
    }
}

/// One access a stream issued that the other stream may not have waited for yet.
#[derive(Clone, Debug)]
struct Access {
    /// Its position in its stream's accesses.
    pos: u64,
    what: String,
    reads: Vec<Span>,
    writes: Vec<Span>,
}

fn overlap(a: &Span, b: &Span) -> bool {
    a.bytes > 0 && b.bytes > 0 && a.ptr.0 < b.end() && b.ptr.0 < a.end()
}

fn first_overlap<'a>(xs: &'a [Span], ys: &[Span]) -> Option<&'a Span> {
    xs.iter().find(|x| ys.iter().any(|y| overlap(x, y)))
}

/// The ordering of the two streams, and the unfinished work each may be racing with.
#[derive(Default)]
pub struct Streams {
    /// Accesses issued on each stream so far.
    issued: [u64; 2],
    /// For each stream: how many of the other stream's accesses its waits order before its next one.
    seen: [u64; 2],
    /// Each stream's accesses that the other stream has not waited for and the host has not finished.
    pending: [Vec<Access>; 2],
    /// Each event's last record: the stream and its access count then.
    events: HashMap<usize, (Stream, u64)>,
}

impl Streams {
    /// Checks an access of `stream` against the other stream's unfinished work, then remembers it.
    pub fn access(&mut self, stream: Stream, what: &str, reads: &[Span], writes: &[Span]) -> Result<()> {
        let (me, them) = (index(stream), index(other(stream)));
        for a in self.pending[them].iter().filter(|a| a.pos >= self.seen[me]) {
            let clash = first_overlap(writes, &a.reads)
                .map(|s| (s, "writes", "reads"))
                .or_else(|| first_overlap(writes, &a.writes).map(|s| (s, "writes", "writes")))
                .or_else(|| first_overlap(reads, &a.writes).map(|s| (s, "reads", "writes")));
            if let Some((span, mine, theirs)) = clash {
                return Err(Error::msg(format!(
                    "emulated device: a race between streams: {what} on the {} stream {mine} {} bytes at {:#x} while \
                     {} on the {} stream, not yet ordered before it by any event, {theirs} them (a missing \
                     Device::wait)",
                    stream.name(),
                    span.bytes,
                    span.ptr.0,
                    a.what,
                    other(stream).name()
                )));
            }
        }
        let pos = self.issued[me];
        self.issued[me] += 1;
        self.pending[me].push(Access { pos, what: what.to_string(), reads: reads.to_vec(), writes: writes.to_vec() });
        Ok(())
    }

    pub fn record(&mut self, stream: Stream, event: EventId) {
        self.events.insert(event.0, (stream, self.issued[index(stream)]));
    }

    /// `stream` waits for `event`'s last record. Waiting on an event never recorded is an error here (CUDA would
    /// let it pass at once, which always hides a bug in the caller).
    pub fn wait(&mut self, stream: Stream, event: EventId) -> Result<()> {
        let &(on, count) = self.events.get(&event.0).ok_or_else(|| {
            Error::msg(format!(
                "emulated device: the {} stream waits on event {} that was never recorded",
                stream.name(),
                event.0
            ))
        })?;
        if on != stream {
            let me = index(stream);
            self.seen[me] = self.seen[me].max(count);
            // The other stream's accesses before the event are ordered before everything `stream` issues from now
            // on, and `stream` is the only other stream: nothing can race with them any more.
            let seen = self.seen[me];
            self.pending[index(on)].retain(|a| a.pos >= seen);
        }
        Ok(())
    }

    /// The host waited for `stream`: its work so far is finished.
    pub fn finished(&mut self, stream: Stream) {
        self.pending[index(stream)].clear();
    }
}

/// The cross-stream rules of one capture (begun on the compute stream).
#[derive(Default)]
pub struct CaptureStreams {
    /// Events the compute stream recorded inside the capture.
    compute_events: Vec<usize>,
    /// Whether the communication stream has joined the capture (waited on one of them).
    forked: bool,
    /// Commands issued to the communication stream inside the capture, and the last one.
    comm_commands: u64,
    last_comm: String,
    /// Each event the communication stream recorded: its command count then.
    comm_events: HashMap<usize, u64>,
    /// Comm commands the compute stream has waited for.
    joined: u64,
}

impl CaptureStreams {
    pub fn record(&mut self, stream: Stream, event: EventId) {
        match stream {
            Stream::Compute => self.compute_events.push(event.0),
            Stream::Comm => {
                self.comm_events.insert(event.0, self.comm_commands);
            }
        }
    }

    pub fn wait(&mut self, stream: Stream, event: EventId) {
        match stream {
            Stream::Comm => self.forked |= self.compute_events.contains(&event.0),
            Stream::Compute => {
                if let Some(&n) = self.comm_events.get(&event.0) {
                    self.joined = self.joined.max(n);
                }
            }
        }
    }

    /// A command issued to `stream` while capturing.
    pub fn command(&mut self, stream: Stream, what: &str) -> Result<()> {
        if stream == Stream::Comm {
            if !self.forked {
                return Err(Error::msg(format!(
                    "emulated device: {what} on the comm stream while capturing, but the comm stream has not waited on \
                     an event the capturing compute stream recorded: it is not part of the capture and would run at \
                     once, outside the graph"
                )));
            }
            self.comm_commands += 1;
            self.last_comm = what.to_string();
        }
        Ok(())
    }

    /// At the end of the capture: every command of the communication stream joined back into the compute stream.
    pub fn end(&self) -> Result<()> {
        if self.joined < self.comm_commands {
            return Err(Error::msg(format!(
                "emulated device: end_capture with the comm stream's work ({}) not joined back into the compute \
                 stream (no wait on an event recorded after it): cuStreamEndCapture fails with \
                 CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
                self.last_comm
            )));
        }
        Ok(())
    }
}
