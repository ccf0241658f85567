Feature: Provisioning, handoff and supervision by pool-managerd
  pool-managerd starts a llama-server for each configured pool, hands it off to orchestratord
  with a handoff file in the shared runtime directory, and restarts an engine that dies.

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |

  Scenario: pool-managerd provisions the engine and hands it off to orchestratord
    Then pool-managerd has written the handoff file of pool "p0" naming a live engine on loopback
    And orchestratord lists pool "p0" as ready with 1 slot
    And a task of 8 tokens completes on pool "p0"

  Scenario: A killed engine is restarted and its pool is ready again
    When the engine of pool "p0" is killed
    Then pool-managerd reports pool "p0" not ready, then ready again with restart count 1
    And the handoff file of pool "p0" names a new engine process
    And orchestratord lists pool "p0" as ready with 1 slot
    And a task of 8 tokens completes on pool "p0"
