Feature: Authentication and roles
  Every API route but /health, /ready and /metrics needs a Bearer secret. Client keys, the
  admin token and the node token are separate roles; a secret of another role is refused, and a
  refused secret is never echoed.

  Background:
    Given a HOME stack with separate client, admin and node secrets and the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |

  Scenario: A request without a token is refused with 401
    When a request without a token GETs "/v2/pools"
    Then the answer is 401 with code "UNAUTHORIZED"

  Scenario: A request with a wrong token is refused with 401 and the token is not echoed
    When a request with a wrong token GETs "/v2/pools"
    Then the answer is 401 with code "UNAUTHORIZED"
    And the answer does not contain the wrong token

  Scenario: A client key submits and follows its own task, which other clients cannot see
    When a client submits an interactive task "mine" of 8 tokens
    And the client follows the events of task "mine" to the end
    Then the stream of task "mine" ends with an end event
    And a request with the client key for task "mine" is answered 200
    And a request with the other client key for task "mine" is answered 404

  Scenario: Client keys and the node token are refused on an admin route with 403
    When a request with the client key POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 403 with code "FORBIDDEN"
    When a request with the node token POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 403 with code "FORBIDDEN"
    And orchestratord lists pool "p0" as ready with 1 slot

  Scenario: pool-managerd takes the node token only
    Then pool-managerd answers 401 to a request with the client key for "/v2/pools"
    And pool-managerd answers 401 to a request with the admin token for "/v2/pools"
    And pool-managerd answers 200 to a request with the node token for "/v2/pools"

  Scenario: The admin token drains a pool and orchestratord is then not ready
    When a request with the admin token POSTs "/v2/pools/p0/drain" with '{"deadline_ms": 1000}'
    Then the answer is 202
    And "/ready" answers 503 without a token within 10 seconds
