Feature: Authentication and roles
  Every API route but /health, /ready and /metrics needs a Bearer secret. Client keys, the
  admin token and the node token are separate roles; a secret of another role is refused, and a
  refused secret is never echoed.

  Background:
    Given a HOME stack with separate client, admin and node secrets and the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |

  @AUTH-5101
  Scenario: A request without a token is refused with 401
    When a request without a token GETs "/v2/pools"
    Then the answer is 401 with code "UNAUTHORIZED"

  @AUTH-5101
  Scenario: A request with a wrong token is refused with 401 and the token is not echoed
    When a request with a wrong token GETs "/v2/pools"
    Then the answer is 401 with code "UNAUTHORIZED"
    And the answer does not contain the wrong token

  @AUTH-5105
  Scenario: A client key submits and follows its own task, which other clients cannot see
    When a client submits an interactive task "mine" of 8 tokens
    And the client follows the events of task "mine" to the end
    Then the stream of task "mine" ends with an end event
    And a request with the client key for task "mine" is answered 200
    And a request with the other client key for task "mine" is answered 404
    And a request with the admin token for task "mine" is answered 200

  @AUTH-5101
  Scenario: Client keys and the node token are refused on an admin route with 403
    When a request with the client key POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 403 with code "FORBIDDEN"
    When a request with the node token POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 403 with code "FORBIDDEN"
    And orchestratord lists pool "p0" as ready with 1 slot

  @AUTH-5102
  Scenario: pool-managerd takes the node token only
    Then pool-managerd answers 401 to a request with the client key for "/v2/pools"
    And pool-managerd answers 401 to a request with the admin token for "/v2/pools"
    And pool-managerd answers 200 to a request with the node token for "/v2/pools"

  @OBS-6116 @OBS-6110
  Scenario: The admin token drains a pool through orchestratord, which is then not ready
    When a request with the admin token POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 202
    And pool-managerd reports pool "p0" stopped within 10 seconds
    And "/ready" answers 503 without a token within 10 seconds
