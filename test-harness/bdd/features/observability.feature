Feature: Health, readiness and metrics
  /health, /ready and /metrics answer without a token; /metrics counts tasks with the families
  the lint list declares; every answer carries a correlation id.

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |

  @OBS-6110
  Scenario: Liveness and readiness answer without a token
    Then "/health" answers 200 without a token
    And "/ready" answers 200 without a token with 1 ready pool

  @OBS-6101
  Scenario: The task counters count a completed task
    Given the metrics are sampled
    When a client submits an interactive task "counted" of 8 tokens
    Then task "counted" completes on pool "p0"
    And the metric 'tasks_enqueued_total{priority="interactive"}' rose by 1
    And the metric 'tasks_started_total{pool_id="p0"}' rose by 1
    And the metric 'tasks_completed_total{outcome="end",pool_id="p0"}' rose by 1
    And the metric 'tokens_out_total{pool_id="p0"}' rose by the tokens of task "counted"
    And every metric family orchestratord exposes is in the lint list with its type and labels

  @ORCH-2103
  Scenario: A correlation id sent by the client is echoed
    When a request with the client key GETs "/v2/pools" with X-Correlation-Id "bdd-corr-42"
    Then the answer is 200
    And the answer echoes X-Correlation-Id "bdd-corr-42"
