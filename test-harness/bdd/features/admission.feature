Feature: Admission and queue policies
  orchestratord admits tasks into a bounded queue, starts interactive tasks before batch ones
  (first in, first out within a class) and answers what it cannot queue with a typed,
  retriable error. The pool has one slot on the slow model, so a long task keeps it busy
  while the queue fills.

  Rule: a full queue with the reject policy refuses new tasks

    Background:
      Given orchestratord runs with:
        | ORCHD_ADMISSION_CAPACITY | 3      |
        | ORCHD_ADMISSION_POLICY   | reject |
      And a HOME stack with the pools:
        | pool | slots | model | ctx  |
        | p0   | 1     | slow  | 8192 |

    @ORCH-2101
    Scenario: An admitted task gets its id, its queue position and its event streams
      When a client submits an interactive task "t1" of 8 tokens
      Then the answer is 202
      And the admission gives a queue position and the event streams of task "t1"
      And task "t1" completes on pool "p0"

    @ORCH-2105
    Scenario: A full queue answers 429 with a retry hint
      Given a long task "hog" is running
      And batch tasks "b1" and "b2" are queued
      And a batch task "b3" is queued
      And the metrics are sampled
      When a client submits an interactive task "late" of 8 tokens
      Then the answer is 429 with code "ADMISSION_REJECT"
      And the answer carries Retry-After and X-Backoff-Ms of at least one second
      And the error is retriable with policy label "reject"
      And the metric 'tasks_rejected_total{reason="queue_full"}' rose by 1

    @ORCH-2107
    Scenario: Interactive tasks start before batch tasks, each class first in first out
      Given a long task "hog" is running
      And batch tasks "b1" and "b2" are queued
      When a client submits an interactive task "i1" of 8 tokens
      Then task "i1" is at queue position 0
      And task "b1" is at queue position 1
      And task "b2" is at queue position 2
      When task "hog" is cancelled
      Then task "i1" starts before task "b1"
      And task "b1" starts before task "b2"
      And task "b2" completes on pool "p0"

    @ORCH-2102 @ORCH-2103
    Scenario: Refusals share one error envelope and every answer has a correlation id
      When a client submits a task with max_tokens 0
      Then the answer is 400 with code "INVALID_PARAMS"
      And the answer carries an X-Correlation-Id
      When a request with the client key GETs "/v2/no-such-route"
      Then the answer is 404 with code "NOT_FOUND"
      And the answer carries an X-Correlation-Id
      When a request with the client key GETs "/v2/tasks"
      Then the answer is 405 with code "METHOD_NOT_ALLOWED"
      And the answer carries an X-Correlation-Id

    @ORCH-2104
    Scenario: Submitting the same task id twice gives one task, another body is a conflict
      When a client submits the task "same-id" twice with one body
      Then both answers are 202 for task "same-id"
      And task "same-id" completes on pool "p0"
      And task "same-id" reached an engine once
      When a client submits the task "same-id" again with another body
      Then the answer is 409 with code "CONFLICT"

  Rule: a full queue with the drop-lru policy drops the oldest queued batch task

    Background:
      Given orchestratord runs with:
        | ORCHD_ADMISSION_CAPACITY | 2        |
        | ORCHD_ADMISSION_POLICY   | drop-lru |
      And a HOME stack with the pools:
        | pool | slots | model | ctx  |
        | p0   | 1     | slow  | 8192 |

    @ORCH-2106
    Scenario: The oldest queued batch task ends with QUEUE_FULL_DROP_LRU
      Given a long task "hog" is running
      And batch tasks "oldest" and "newer" are queued
      When a client submits an interactive task "newest" of 8 tokens
      Then the answer is 202
      And task "oldest" ends with error "QUEUE_FULL_DROP_LRU"
      And task "oldest" never reached an engine
      When task "hog" is cancelled
      Then task "newer" completes on pool "p0"
      And task "newest" completes on pool "p0"

    @ORCH-2106
    Scenario: With no batch task queued, a full queue refuses even under drop-lru
      Given a long task "hog" is running
      And an interactive task "q1" is queued
      And an interactive task "q2" is queued
      When a client submits an interactive task "late" of 8 tokens
      Then the answer is 429 with code "ADMISSION_REJECT"
