Feature: Streaming and cancellation
  A task's events stream over SSE: queued, started, its tokens, then exactly one terminal
  event, each frame with an id a reconnecting client can resume after. Cancelling a task ends
  it with CANCELLED whether it was queued or running.

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | slow  | 8192 |

  @ORCH-2301 @ORCH-2303 @ORCH-2304 @ORCH-2306
  Scenario: A task streams started, its tokens and one end event
    When a client submits an interactive task "t" of 16 tokens
    And the client follows the events of task "t" to the end
    Then the stream of task "t" has queued events, then one started event on pool "p0", then tokens, then one end event
    And the token events of task "t" are numbered from 0 up by one
    And the end event of task "t" has a finish reason and counts its token events
    And the frame ids of task "t" increase
    And the verbose stream of task "t" also carries a metrics event
    And the status of task "t" reports it completed on pool "p0" after 1 attempt with its token count

  @ORCH-2304
  Scenario: A client reconnecting with Last-Event-ID gets only the later frames
    Given a completed task "t" of 16 tokens
    When the client follows the events of task "t" to the end
    And the client follows the events of task "t" after event id 3
    Then the resumed stream of task "t" holds exactly its frames after id 3
    And a second subscriber of task "t" gets the same frames

  @ORCH-2308 @ORCH-2303
  Scenario: Cancelling a running task ends its stream with CANCELLED and frees the slot
    Given a long task "hog" is running
    When the client receives a token of task "hog"
    And task "hog" is cancelled
    Then the stream of task "hog" ends with error "CANCELLED"
    And task "hog" is in state "cancelled"
    And the engine of pool "p0" has no busy slot within 1 second

  @ORCH-2307
  Scenario: Cancelling a queued task keeps it from ever reaching an engine
    Given a long task "hog" is running
    And an interactive task "waiting" is queued
    When task "waiting" is cancelled
    Then cancelling task "waiting" again answers 204
    And the stream of task "waiting" ends with error "CANCELLED"
    And the stream of task "waiting" has no started event
    And task "waiting" never reached an engine
