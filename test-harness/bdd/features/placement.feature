Feature: Placement and session affinity
  Tasks go to ready pools serving their model, the one with the most free slots first; a pin is
  honoured or refused, never moved elsewhere; the tasks of a session stay on their pool while
  it is ready.

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | a    | 2     | slow  | 8192 |
      | b    | 2     | slow  | 8192 |

  @ORCH-2204
  Scenario: A task pinned to a pool runs on that pool
    When a client submits a task "pinned" of 8 tokens pinned to pool "b"
    Then the answer is 202
    And task "pinned" completes on pool "b"

  @ORCH-2204
  Scenario: A pin to a pool that does not exist is refused, not moved
    When a client submits a task "stray" of 8 tokens pinned to pool "nowhere"
    Then the answer is 503 with code "POOL_UNAVAILABLE"

  @ORCH-2204
  Scenario: Preferred and avoided pools are honoured while an allowed pool is free
    When a client submits a task "preferring" of 8 tokens preferring pool "b"
    Then task "preferring" completes on pool "b"
    When a client submits a task "avoiding" of 8 tokens avoiding pool "a"
    Then task "avoiding" completes on pool "b"

  @ORCH-2202 @ORCH-2207 @ORCH-2208
  Scenario: A session stays on its pool while another pool has more free slots
    Given a task "turn-1" of session "chat" has completed
    And a long task "hog" pinned to the pool of task "turn-1" is running
    When a client submits a task "turn-2" of 4 tokens in session "chat"
    And a client submits an interactive task "no-session" of 4 tokens
    Then task "turn-2" completes on the pool of task "turn-1"
    And task "no-session" completes on the pool other than that of task "turn-1"
    And session "chat" reports 2 turns, the last on the pool of task "turn-1"
    When session "chat" is deleted
    Then session "chat" is unknown

  @ORCH-2205
  Scenario: A burst of tasks is spread over both pools without oversubscribing an engine
    When a client submits 6 tasks of 200 tokens
    Then the 6 tasks complete while no engine defers a request
    And pools "a" and "b" both ran some of them
